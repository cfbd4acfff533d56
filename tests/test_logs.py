"""Specification of moelab.logs: metrics.jsonl read back, whole or cut short."""

import pytest

from moelab.logs import MetricsLog, read_rows


def test_a_torn_last_line_is_left_out_and_a_damaged_middle_is_named(tmp_path):
    """A last line cut mid-write is not a row; a malformed line before others is an error
    naming the file and the line (not a bare JSON-parser message)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_rows(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl' line 2 is not a JSON row"):
        read_rows(path)


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path, capsys):
    """``truncate_after`` keeps the rows up to the checkpoint's step and drops a torn line with
    a note naming the file."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    MetricsLog(tmp_path, tensorboard=False, truncate_after=2).close()
    assert read_rows(path) == [{"step": 1}, {"step": 2}]
    assert f"torn last line of {str(path)!r}" in capsys.readouterr().err
