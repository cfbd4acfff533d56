"""The GPU check scripts, without a GPU: shellcheck-clean, their JSON helpers, and the dry runs
(``DRY_RUN=1``: the same steps on the CPU at toy sizes) writing every JSON file they promise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["scripts/device_check.sh", "scripts/device_lab.sh"]
sys.path.insert(0, str(ROOT / "scripts"))

import device_report  # noqa: E402


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_scripts_are_shellcheck_clean(script):
    res = subprocess.run(["shellcheck", script], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_junit_summary_counts_passed_failed_and_skipped(tmp_path):
    """A JUnit file becomes counts plus the failed and skipped tests with their reasons; a
    missing file (pytest killed) is an error entry, not a crash."""
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="boom&#10;more"/></testcase>'
        '<testcase classname="t" name="c"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    got = device_report.junit(xml)
    assert got == {
        "tests": 3,
        "passed": 1,
        "failed": {"t::b": ["boom"]},
        "skipped": {"t::c": "needs a CUDA device"},
    }
    assert "error" in device_report.junit(tmp_path / "missing.xml")


def test_losses_of_two_runs_are_compared_step_by_step(tmp_path):
    for name, losses in (("a", [4.0, 3.0]), ("b", [4.0, 3.0003])):
        (tmp_path / name).mkdir()
        rows = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    got = device_report.losses(tmp_path / "a", tmp_path / "b", rtol=1e-4)
    assert got["steps"] == [1, 2] and got["within"] is False
    assert got["max_rel_diff"] == pytest.approx(1e-4)
    assert device_report.losses(tmp_path / "a", tmp_path / "none", 1e-4)["within"] is False


@pytest.mark.slow
def test_the_device_check_dry_run_writes_every_json(tmp_path):
    """DRY_RUN=1 on the CPU: every step exits 0 and each promised JSON file is there."""
    env = {**os.environ, "OUT": str(tmp_path), "DRY_RUN": "1", "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", "scripts/device_check.sh"], cwd=ROOT, env=env, capture_output=True, timeout=900
    )
    assert res.returncode == 0, res.stderr
    names = ["cuda_tests", "tiny_curves", "ep_nccl", "moe_layer_cuda", "device_check"]
    for name in names:
        json.loads((tmp_path / f"{name}.json").read_text())
    record = json.loads((tmp_path / "device_check.json").read_text())
    assert record["dry_run"] and all(s["rc"] == 0 for s in record["steps"].values())
    assert json.loads((tmp_path / "tiny_curves.json").read_text())["pairs"]


@pytest.mark.slow
def test_the_lab_script_stops_at_its_deadline_and_reports(tmp_path):
    """device_lab.sh with a 3-second budget stops the lab and writes lab_runs.json; without
    EXPERIMENTS it runs every experiment of the suite that has a [decisive] table (it once
    looked for them in a folder that does not exist, and ran none)."""
    env = {**os.environ, "OUT": str(tmp_path), "DRY_RUN": "1", "PYTHON": sys.executable}
    env.pop("EXPERIMENTS", None)
    res = subprocess.run(
        ["bash", str(ROOT / "scripts/device_lab.sh"), "3", "1"], cwd=ROOT, env=env,
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "lab_runs.json").read_text())["finished"] >= 0
    first = (tmp_path / "lab_runs.log").read_text().splitlines()[0]
    assert all(name in first.split() for name in ("capacity", "fluctuation", "stability")), first
