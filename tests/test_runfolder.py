"""Specification of moelab.runfolder: one writer per run folder, no run replaced by accident,
and a resume that keeps the run it continues."""

import json
import os
import socket
import subprocess
import sys

import pytest

from moelab import runfolder
from moelab.checkpoint import CheckpointError
from moelab.errors import RunError


def test_a_free_folder_holds_no_run_and_a_used_one_is_refused(tmp_path):
    """An empty or unrelated folder is free; one with a run file is refused for a new run with
    one line naming --resume, --overwrite and another --out."""
    (tmp_path / "notes.txt").write_text("mine")
    runfolder.check_new_run(tmp_path, overwrite=False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="--resume.*--overwrite.*another --out"):
        runfolder.check_new_run(tmp_path, overwrite=False)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_overwrite_removes_the_old_runs_checkpoints(tmp_path):
    """With overwrite the old checkpoints, pointer and summary go (none of them can be resumed
    by mistake later); other files stay."""
    for name in ("ckpt-000004.pt", "latest.json", "summary.json", "config.json", "notes.txt"):
        (tmp_path / name).write_text("x")
    runfolder.check_new_run(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "notes.txt"]


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    """While one process holds the lock, taking it again is refused naming its PID; after
    release it can be taken."""
    with runfolder.lock(tmp_path):
        holder = json.loads((tmp_path / runfolder.LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunError, match=f"in use by process {os.getpid()}"):
            runfolder.acquire(tmp_path)
    assert not (tmp_path / runfolder.LOCK).exists()
    runfolder.release(runfolder.acquire(tmp_path))


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    """A lock left by a process that no longer runs (killed) is stale: taken over with a note;
    an unreadable lock (a torn write) likewise."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    lock = tmp_path / runfolder.LOCK
    lock.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    runfolder.release(runfolder.acquire(tmp_path))
    assert f"stale lock {str(lock)!r} of process {dead}" in capsys.readouterr().err
    lock.write_text('{"pi')
    runfolder.release(runfolder.acquire(tmp_path))
    assert "unreadable holder" in capsys.readouterr().err


def test_a_lock_whose_pid_now_names_another_process_is_taken_over(tmp_path, capsys):
    """PIDs restart after a reboot or in a new container: a lock whose PID is alive but was
    started at another time (or boot) than the lock records is stale; a lock that records no
    start (written by older moelab) of a live PID still blocks."""
    if runfolder._started(os.getpid()) is None:
        pytest.skip("no /proc: process start times unknown here")
    lock = tmp_path / runfolder.LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    lock.write_text(json.dumps(me | {"started": "another-boot:12345"}))
    runfolder.release(runfolder.acquire(tmp_path))
    assert f"stale lock {str(lock)!r} of process {os.getpid()}" in capsys.readouterr().err
    lock.write_text(json.dumps(me))
    with pytest.raises(RunError, match=f"in use by process {os.getpid()}"):
        runfolder.acquire(tmp_path)
    assert runfolder.in_use(tmp_path)


def test_resume_refuses_a_changed_setting_naming_it(tmp_path):
    """A change outside RESUMABLE is refused naming the setting with its old and new value;
    RESUMABLE settings and the ones named in ``allow`` pass; a setting the saved config lacks
    (added to moelab since) is not a change."""
    saved = {"train": {"lr": 0.01, "steps": 10, "batch_size": 8}, "data": {"seq_len": 32}}
    longer = {"train": {"lr": 0.01, "steps": 20, "batch_size": 8, "new": 1}, "data": saved["data"]}
    runfolder.check_resume(tmp_path, saved, longer)
    other = {"train": {"lr": 0.02, "steps": 10, "batch_size": 4}, "data": {"seq_len": 32}}
    with pytest.raises(CheckpointError, match=r"train.batch_size 8 -> 4; train.lr 0.01 -> 0.02"):
        runfolder.check_resume(tmp_path, saved, other)
    runfolder.check_resume(tmp_path, saved, other, allow=("train.lr", "train.batch_size"))
    with pytest.raises(ValueError, match="--allow-change 'train.lrr': no such setting"):
        runfolder.check_resume(tmp_path, saved, other, allow=("train.lrr",))


def test_resume_refuses_other_data(tmp_path):
    """Another data digest is refused; a checkpoint without one (older moelab) is not checked."""
    runfolder.check_data(tmp_path, None, "abc")
    runfolder.check_data(tmp_path, "abc", "abc")
    with pytest.raises(CheckpointError, match="other data or another tokenizer"):
        runfolder.check_data(tmp_path, "abd", "abc")
