"""moelab.runs, plots and report: reading run folders, the sampling floor of MaxVio, the
figures and the HTML/Markdown report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab import plots, report
from moelab import runs as run_folders

E, K, LAYERS, DOMAINS = 8, 2, 2, ["prose", "code"]


def _counts(rng: np.random.Generator, skew: float) -> list[list[int]]:
    """(LAYERS, E) slot counts; ``skew`` 0 = uniform, larger = a few experts take most."""
    p = np.exp(-skew * np.arange(E))
    return [rng.multinomial(512 * K, p / p.sum()).tolist() for _ in range(LAYERS)]


def _fake_run(path: Path, *, moe: bool, skew: float, val_loss: float, mvg: float) -> Path:
    """A run folder with the files the trainer writes, filled with synthetic numbers."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    moe_cfg = {"num_experts": E, "top_k": K} if moe else None
    config = {"model": {"moe": moe_cfg}, "data": {"seq_len": 64}, "train": {"batch_size": 8}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "summary.json").write_text(json.dumps({"params": 123456, "active_params": 45678}))
    rows = []
    for step in range(1, 21):
        row = {"step": step, "loss": 8 - 0.1 * step, "tokens_per_s": 1234.5, "drop_rate": 0.0}
        if moe:
            row |= {
                "maxvio_batch": 0.5 + skew / step,
                "maxvio_batch_layers": [0.5, 0.5],
                "dead_window_layers": [int(skew > 1), 1 if skew > 1 else 0],
                "dead_layers": [0, 0],
                "counts_layers": _counts(rng, skew),
            }
        rows.append(row)
        if step % 10 == 0:
            ev = {"step": step, "val_loss": val_loss + 1 / step}
            ev |= {f"val_loss/{d}": val_loss for d in DOMAINS}
            if moe:
                ev |= {
                    "maxvio_global": mvg,
                    "mi": 0.25,
                    "counts_layers": _counts(rng, skew),
                    "domain_freq_layers": [[[1 / E] * E for _ in DOMAINS]] * LAYERS,
                }
            rows.append(ev)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    return {
        "none": _fake_run(tmp_path / "none", moe=True, skew=2.0, val_loss=3.21, mvg=4.567),
        "aux": _fake_run(tmp_path / "aux", moe=True, skew=0.0, val_loss=3.25, mvg=0.123),
        "dense": _fake_run(tmp_path / "dense", moe=False, skew=0.0, val_loss=3.3, mvg=0),
    }


def test_load_run_splits_training_and_evaluation_rows(runs):
    """Training rows carry ``loss``, evaluation rows ``val_loss``; the config gives T, E, k."""
    run = run_folders.load_run("none", runs["none"])
    assert len(run.train_rows) == 20 and len(run.eval_rows) == 2
    assert run.is_moe and run.num_experts == E and run.top_k == K
    assert run.batch_tokens == 8 * 64
    assert not run_folders.load_run("dense", runs["dense"]).is_moe


def test_summary_table_has_the_final_numbers(runs):
    """One row per run, with the last evaluation's numbers and '–' where nothing applies."""
    rows = run_folders.summary_table(run_folders.load_runs(runs))
    assert [r["run"] for r in rows] == ["none", "aux", "dense"]
    none, aux, dense = rows
    assert none["val loss"] == pytest.approx(3.21 + 1 / 20)
    assert none["MaxVio_global"] == 4.567 and aux["MaxVio_global"] == 0.123
    assert none["dead experts"] == 2 and aux["dead experts"] == 0
    assert none["starved experts"] > 0 and aux["starved experts"] == 0
    assert dense["MaxVio_global"] is None and dense["dead experts"] is None
    assert "| none | 0.12M | 0.05M | 3.260 | 4.567 |" in report.table_markdown(rows)


def test_write_report_embeds_images_and_table(runs, tmp_path):
    """report.html is self-contained (every PNG as base64) and holds the table values;
    report.md references PNG files that exist beside it."""
    out = tmp_path / "report"
    html_path, md_path = report.write_report(runs, out, "Test report", "Some `intro`.")
    html_text, md_text = html_path.read_text(), md_path.read_text()
    for plot in plots.PLOTS:
        assert (out / plot.file).stat().st_size > 1000
        assert f"]({plot.file})" in md_text
    assert html_text.count('src="data:image/png;base64,') == len(plots.PLOTS)
    assert 'src="loss.png"' not in html_text  # nothing points outside the file
    for value in ("4.567", "0.123", "3.260", "<code>intro</code>"):
        assert value in html_text
    assert "4.567" in md_text and "tokens per expert" in md_text.lower()
    assert "how to read this" in html_text.lower() and "<table>" in html_text


def _reference_maxvio(tokens: int, experts: int, k: int, trials: int) -> float:
    """Direct simulation: torch.multinomial draws k distinct experts per token, uniformly."""
    gen = torch.Generator().manual_seed(123)
    chosen = torch.multinomial(torch.ones(trials * tokens, experts), k, generator=gen)
    c_NE = torch.nn.functional.one_hot(chosen.view(trials, tokens * k), experts).sum(1).float()
    mean_N = c_NE.mean(-1)
    return float(((c_NE.amax(-1) - mean_N) / mean_N).mean())


@pytest.mark.parametrize(("tokens", "experts", "k"), [(256, 8, 2), (1024, 16, 1), (2048, 16, 2)])
def test_sampling_maxvio_matches_direct_multinomial_simulation(tokens, experts, k):
    """The floor agrees with a plain torch.multinomial simulation (within ~3 standard errors)."""
    ours = run_folders.sampling_maxvio(tokens, experts, k, trials=200)
    ref = _reference_maxvio(tokens, experts, k, trials=200)
    assert ours == pytest.approx(ref, rel=0.08)


def test_sampling_maxvio_falls_with_tokens_like_the_square_root_law():
    """The floor falls with batch size as 1/sqrt(T); sqrt(2 ln E·E/(T·k)) bounds it from above
    within a factor < 1.6 for E = 16."""
    sizes = [128, 512, 2048, 8192]
    floors = [run_folders.sampling_maxvio(t, 16, 2, trials=400) for t in sizes]
    assert all(a > b for a, b in zip(floors, floors[1:], strict=False))
    assert floors[0] / floors[-1] == pytest.approx(math.sqrt(sizes[-1] / sizes[0]), rel=0.15)
    for t, f in zip(sizes, floors, strict=True):
        approx = run_folders.maxvio_floor_approx(t, 16, 2)
        assert f < approx < 1.6 * f


def test_markdown_to_html_renders_the_subset_the_report_uses():
    """Headings, lists with continuation lines, pipe tables, inline code, escaping."""
    out = report.markdown_to_html("## Title\n\n- a `x<1`\n  more\n- **b**\n\n| h |\n|---|\n| 1 |")
    assert "<h2>Title</h2>" in out
    assert "<li>a <code>x&lt;1</code> more</li>" in out and "<strong>b</strong>" in out
    assert "<th>h</th>" in out and "<td>1</td>" in out
