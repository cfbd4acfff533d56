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


def test_readme_sampling_floor_figures_match_the_simulation():
    """The MaxVio_batch floor the README quotes (factor·/√t, its value at t = 256, the
    factors at E = 8 and 64) is what ``moelab.runs.sampling_maxvio`` simulates."""
    import math

    from moelab.runs import sampling_maxvio

    def factor(t: int, E: int, k: int = 2) -> float:
        return sampling_maxvio(t * E // k, E, k) * math.sqrt(t)

    line = " ".join(README.split())
    m = re.search(r"≈ ([\d.]+)/√t .*?E = 16, k = 2 \(([\d.]+) at t = (\d+)\)", line)
    assert m, "the README's sampling-floor sentence changed; update this test"
    quoted, at, t = float(m[1]), float(m[2]), int(m[3])
    assert abs(factor(1024, 16) - quoted) < 0.05
    assert abs(sampling_maxvio(t * 8, 16, 2) - at) < 0.005
    m8 = re.search(r"≈ ([\d.]+) at E = 8, ([\d.]+) at E = 64, k = 2", line)
    assert m8, "the README's factors at E = 8 and 64 changed; update this test"
    assert abs(factor(1024, 8) - float(m8[1])) < 0.05
    assert abs(factor(1024, 64) - float(m8[2])) < 0.08
