"""``moelab demo --quick`` end to end through a subprocess, and the demo's skip-if-done rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moelab import demo, plots, runs


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the quick demo once for the whole module (it trains four tiny runs)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "moelab", "demo", "--quick", "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,  # seconds on an idle 2-core machine; generous for shared CI
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_quick_demo_writes_the_report(quick_demo):
    """report.html (images embedded), report.md and every PNG exist; the CLI says where."""
    out, proc = quick_demo
    assert str(out / "report.html") in proc.stdout
    for plot in plots.PLOTS:
        assert (out / plot.file).stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(plots.PLOTS)


def test_quick_demo_table_has_the_four_runs(quick_demo):
    """The summary table lists none, aux, loss-free and dense, each with a validation loss."""
    out, _ = quick_demo
    md = (out / "report.md").read_text()
    for name in ("none", "aux", "loss-free", "dense"):
        assert f"| {name} |" in md
        assert (out / name / "summary.json").exists()
    rows = runs.summary_table(runs.load_runs({r.name: out / r.name for r in demo.demo_runs()}))
    assert all(r["val loss"] is not None for r in rows)
    assert rows[-1]["MaxVio_global"] is None  # the dense twin has no experts


def test_finished_runs_are_skipped_only_for_the_same_config(quick_demo):
    """A run folder with summary.json counts as done for its own config, not for another."""
    out, _ = quick_demo
    shared = demo.schedule_overrides(3, quick=True, seed=0)
    aux = demo.demo_runs()[1]
    assert demo.is_done(out / "aux", demo.resolve(aux, shared))
    other = demo.schedule_overrides(4, quick=True, seed=0)
    assert not demo.is_done(out / "aux", demo.resolve(aux, other))


def test_demo_runs_share_preset_and_differ_only_in_balancing():
    """none / aux / loss-free use the same preset; only their balance settings differ."""
    shared = demo.schedule_overrides(10, quick=False, seed=3)
    none, aux, free, dense = (demo.resolve(r, shared) for r in demo.demo_runs())
    assert none.model.moe.balance.aux_coef == 0 and none.model.moe.balance.bias_rate == 0
    assert aux.model.moe.balance.aux_coef == 0.01
    assert free.model.moe.balance.bias_rate == 1e-3
    assert none.train == aux.train == free.train and none.train.seed == 3
    assert dense.model.moe is None
