"""The lab report (moelab/lab/report.py): checks with their noise model, generated findings."""

from __future__ import annotations

import json

from moelab.lab import report

CHECK = {
    "check": "aux.maxvio_global < 0.5×none.maxvio_global",
    "kind": "key",
    "outcome": "holds",
    "raw_outcome": "holds",
    "delta": -1.25,
    "se": 0.1,
    "ci95": [-1.68, -0.82],
    "mde": 0.284,
    "flip_rate": 0.0,
    "paper": None,
    "why": "aux halves imbalance",
    "revised": "",
    "passed": True,
}
SANITY = dict(CHECK, check="none.max_over_mean > 2.0", kind="sanity", outcome="holds")


def _result(**kw) -> dict:
    res = {
        "name": "collapse",
        "number": "1",
        "title": "Collapse",
        "claim": "c",
        "verdict": "reproduced",
        "checks": [CHECK, SANITY],
        "quick": False,
        "too_short": "",
        "seeds": 3,
        "variants_run": ["none", "aux", "loss_free"],
        "missing_variants": [],
        "paper": {},
        "measured": {"aux": {"maxvio_global": {"mean": 1.0, "std": 0.1, "n": 3}}},
        "analysis": {},
        "setup": {"aux": {"tokens_per_expert_per_step": 256.0}},
        "batch_tokens": 2048,
        "tokens_per_expert_per_step": 256.0,
        "plots": [],
    }
    return res | kw


def test_report_shows_outcome_ci_mde_and_updates_the_readme_block(tmp_path):
    """results/README.md has each check's outcome, Δ with its CI, MDE, flip rate and
    provenance; the repository README's generated block lists the key checks only, and text
    outside the block is kept."""
    root = tmp_path / "results"
    (root / "collapse").mkdir(parents=True)
    (root / "collapse" / "result.json").write_text(json.dumps(_result()))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold text\n{report.END}\noutro\n")
    written = report.write_report(root)
    md = (root / "README.md").read_text()
    assert "✓ holds" in md and "-1.25 [-1.68, -0.82]" in md and "0.284" in md and "0%" in md
    assert "written before the runs" in md or "added after results" in md
    text = readme.read_text()
    assert readme in written and "old text" not in text
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "aux.maxvio_global" in text and "none.max_over_mean" not in text  # sanity: not shown
    assert "MDE 0.284" in text


def test_short_results_are_not_findings(tmp_path):
    """A result whose runs were too short says so instead of listing outcomes."""
    root = tmp_path / "results"
    (root / "collapse").mkdir(parents=True)
    res = _result(too_short="150 steps < decisive 1000", verdict="inconclusive")
    (root / "collapse" / "result.json").write_text(json.dumps(res))
    found = report.load_results(root)
    text = report.findings_markdown(found)
    assert "not yet run at its decisive size" in text and "✓" not in text


def test_a_2_se_outcome_whose_ci_holds_the_bound_says_so():
    """A check decided by the 2-SE rule whose t-based 95 % CI still includes 0 (few seeds)
    is marked as such wherever its outcome is printed; one whose CI excludes 0 is not, and an
    inconclusive one needs no mark."""
    weak = dict(CHECK, outcome="fails", delta=0.09, ci95=[-0.03, 0.21])
    assert report.ci_caveat(weak) == " (by 2 SE; its 95 % CI includes 0)"
    assert report.ci_caveat(CHECK) == ""
    assert report.ci_caveat(dict(weak, outcome="inconclusive")) == ""
    assert "95 % CI includes 0" in report._outcome_text(weak)
    assert "95 % CI includes 0" in report._check_cells(weak, "collapse")[2]


def test_a_per_seed_statistic_in_the_analysis_reads_as_mean_sd_and_its_values():
    """Analysis entries such as experiment 3b's contrasts are per-seed statistics: shown as
    mean ± SD with the per-seed values, not as a raw dict."""
    stat = {"mean": -0.31482, "std": 0.2509, "n": 3, "values": [-0.0743, -0.575, -0.295]}
    assert report._number(stat) == "-0.315 ± 0.25 (per seed [-0.0743, -0.575, -0.295])"
