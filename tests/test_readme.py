"""The README's promises: its Python example runs, and the commands it names exist."""

import re
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_python_example_runs():
    """Every ```python block of the README executes as written."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_names_the_two_scripts_and_they_exist():
    """The two newcomer commands point at scripts that exist; CI runs the test one."""
    root = Path(__file__).parents[1]
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in README
        assert (root / script).is_file()
    assert "scripts/test.sh" in (root / ".ci" / "run").read_text()
