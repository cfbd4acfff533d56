"""Specification of moelab.runconfig's loading: malformed config sources give one ValueError
naming what is wrong, never a traceback."""

import pytest

from moelab.runconfig import load_run_config


def test_a_base_loop_is_refused_naming_the_chain(tmp_path):
    """``base`` files that include each other are a loop, not a RecursionError."""
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(f'base = "{b}"\n')
    b.write_text(f'base = "{a}"\n')
    with pytest.raises(ValueError, match="config base loop: .*a.toml -> .*b.toml -> .*a.toml"):
        load_run_config(str(a))


@pytest.mark.parametrize(
    "text, suffix, message",
    [
        ("[1, 2]", ".json", "holds a list, not a table of settings"),
        ("model = 5\n", ".toml", "model=5 is not allowed; expected a table of settings"),
        ("base = 5\n", ".toml", "base=5 in"),
    ],
)
def test_a_file_with_the_wrong_shape_is_refused(tmp_path, text, suffix, message):
    """A JSON list as config, a scalar for a table and a non-string base name the problem."""
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_run_config(str(path))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.moe=5", "model.moe=5 is not allowed; expected a table of settings"),
        ("model.moe.router=1", "model.moe.router=1 is not allowed; expected a table"),
        ("data.sources=5", "data.sources=5 is not allowed; expected a list"),
        ("data.sources='a.txt'", "data.sources='a.txt' is not allowed; expected a list"),
        ("train=3", "train=3 is not allowed"),
    ],
)
def test_a_scalar_where_a_table_or_list_belongs_is_refused(override, message):
    """``--set`` of a scalar on a table or a list field names the key (no AttributeError or
    TypeError from deep inside)."""
    with pytest.raises(ValueError, match=message):
        load_run_config("tiny", [override])
