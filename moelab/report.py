"""Plots and a self-contained report over run folders (metrics.jsonl, summary.json, config.json).

Every ``plot_*`` function takes ``list[Run]`` and returns a matplotlib Figure (Agg backend), so
the demo and the experiment suite share them. ``write_report`` saves the PNGs and writes an HTML
page (PNGs embedded as base64, one file to mail around) and a Markdown page (PNGs beside it).

Legend: L MoE layers, E experts, K top-k, D domains, T tokens per computation batch.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moelab.logs import read_rows  # noqa: E402

STARVED_SHARE = 0.1  # an expert with under a tenth of its fair share 1/E counts as starved


# ----------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    """One run folder, read: its config, summary and the two kinds of metrics rows."""

    name: str
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    train_rows: list[dict[str, Any]] = field(default_factory=list)  # rows with "loss"
    eval_rows: list[dict[str, Any]] = field(default_factory=list)  # rows with "val_loss"

    @property
    def is_moe(self) -> bool:
        return any("maxvio_batch" in r for r in self.train_rows)

    @property
    def final_eval(self) -> dict[str, Any]:
        return self.eval_rows[-1] if self.eval_rows else {}

    @property
    def num_experts(self) -> int:
        return int(_get(self.config, "model.moe.num_experts", 0) or 0)

    @property
    def top_k(self) -> int:
        return int(_get(self.config, "model.moe.top_k", 1) or 1)

    @property
    def batch_tokens(self) -> int:
        """Tokens per computation batch T: one micro-batch (per rank) of sequences."""
        train = self.config.get("train", {})
        seqs = train.get("micro_batch_size") or train.get("batch_size", 0)
        return int(seqs) * int(_get(self.config, "data.seq_len", 0) or 0)


def _get(d: dict, dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def load_run(name: str, path: str | Path) -> Run:
    """Read a run folder; missing files give empty fields (a run still in progress plots)."""
    path = Path(path)
    rows = read_rows(path / "metrics.jsonl") if (path / "metrics.jsonl").exists() else []
    return Run(
        name=name,
        path=path,
        config=_read_json(path / "config.json"),
        summary=_read_json(path / "summary.json"),
        train_rows=[r for r in rows if "loss" in r],
        eval_rows=[r for r in rows if "val_loss" in r],
    )


def load_runs(runs: dict[str, str | Path]) -> list[Run]:
    """``{name: folder}`` -> runs in the dict's order."""
    return [load_run(name, path) for name, path in runs.items()]


# ----------------------------------------------------------------------------- statistics


def sampling_maxvio(tokens: int, num_experts: int, top_k: int, trials: int = 200, seed: int = 0):
    """Expected MaxVio of one batch under perfectly uniform routing: the sampling floor.

    Each of ``tokens`` tokens picks ``top_k`` distinct experts uniformly at random; returns the
    mean over ``trials`` batches of MaxVio = (max_i c_i − mean c)/mean c (Wang et al. 2024
    eq. 4). No router can beat this on a batch without knowing the batch; it falls as
    ~sqrt(2 ln E · E / (T·k)) (see :func:`maxvio_floor_approx`).
    """
    rng = np.random.default_rng(seed)
    chosen_NTK = _uniform_subsets(rng, (trials, tokens), num_experts, top_k)
    offsets_N11 = (np.arange(trials) * num_experts)[:, None, None]
    counts_NE = np.bincount((chosen_NTK + offsets_N11).ravel(), minlength=trials * num_experts)
    counts_NE = counts_NE.reshape(trials, num_experts).astype(float)
    mean_N = counts_NE.mean(-1)
    return float(((counts_NE.max(-1) - mean_N) / mean_N).mean())


def _uniform_subsets(rng: np.random.Generator, shape: tuple, n: int, k: int) -> np.ndarray:
    """``shape + (k,)`` uniformly random k-subsets of range(n) (Floyd's algorithm, vectorised):
    for j = n−k … n−1 draw t in [0, j]; take t unless already taken, else take j."""
    chosen = np.empty((*shape, k), dtype=np.int64)
    for i, j in enumerate(range(n - k, n)):
        t = rng.integers(0, j + 1, size=shape)
        taken = (chosen[..., :i] == t[..., None]).any(-1)
        chosen[..., i] = np.where(taken, j, t)
    return chosen


def maxvio_floor_approx(tokens: int, num_experts: int, top_k: int) -> float:
    """Closed-form scale of the floor: sqrt(2 ln E · E / (T·k)).

    Each count is ~Normal(μ = T·k/E, σ² ≈ μ) and the max of E of them sits ~σ·sqrt(2 ln E)
    above μ, so MaxVio ≈ sqrt(2 ln E / μ). It overestimates for small E (the max of 16 normals
    is 1.77σ, not 2.35σ): :func:`sampling_maxvio` is the reference, this the scaling law.
    """
    mu = tokens * top_k / num_experts
    return math.sqrt(2 * math.log(num_experts) / mu)


def load_shares_LE(run: Run) -> np.ndarray | None:
    """(L, E) share of slots per layer at the final evaluation (rows sum to 1)."""
    counts = run.final_eval.get("counts_layers")
    if not counts:
        return None
    counts_LE = np.asarray(counts, dtype=float)
    return counts_LE / np.maximum(counts_LE.sum(-1, keepdims=True), 1)


def _dead_series(run: Run) -> tuple[list[int], list[int]]:
    key = "dead_window_layers" if any("dead_window_layers" in r for r in run.train_rows) else None
    key = key or "dead_layers"
    rows = [r for r in run.train_rows if key in r]
    return [r["step"] for r in rows], [int(sum(r[key])) for r in rows]


def summary_row(run: Run, tail: int = 5) -> dict[str, Any]:
    """One table row: the end-of-run numbers of a run (None where it does not apply)."""
    ev, last = run.final_eval, (run.train_rows[-1] if run.train_rows else {})
    mv_tail = [r["maxvio_batch"] for r in run.train_rows if "maxvio_batch" in r][-tail:]
    shares = load_shares_LE(run)
    _, dead = _dead_series(run)
    return {
        "run": run.name,
        "params": run.summary.get("params"),
        "active params": run.summary.get("active_params"),
        "val loss": ev.get("val_loss"),
        "MaxVio_global": ev.get("maxvio_global"),
        "MaxVio_batch (end)": float(np.mean(mv_tail)) if mv_tail else None,
        "dead experts": dead[-1] if dead and run.is_moe else None,
        "starved experts": (
            int((shares < STARVED_SHARE / shares.shape[1]).sum()) if shares is not None else None
        ),
        "drop rate": last.get("drop_rate"),
        "MI (bits)": ev.get("mi"),
        "tokens/s": last.get("tokens_per_s"),
    }


def summary_table(runs: list[Run]) -> list[dict[str, Any]]:
    """One :func:`summary_row` per run."""
    return [summary_row(r) for r in runs]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """A GitHub Markdown table of :func:`summary_table` rows."""
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def table_html(rows: list[dict[str, Any]]) -> str:
    """An HTML table of :func:`summary_table` rows."""
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------- plots


def _colors(runs: list[Run]) -> dict[str, Any]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {r.name: cycle[i % len(cycle)] for i, r in enumerate(runs)}


def plot_loss(runs: list[Run]) -> Figure:
    """Training loss (thin line) and validation loss (markers) of every run on one axis."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = _colors(runs)
    for r in runs:
        c = colors[r.name]
        ax.plot(
            [x["step"] for x in r.train_rows],
            [x["loss"] for x in r.train_rows],
            color=c,
            lw=1,
            alpha=0.6,
            label=f"{r.name} train",
        )
        ax.plot(
            [x["step"] for x in r.eval_rows],
            [x["val_loss"] for x in r.eval_rows],
            "o--",
            color=c,
            label=f"{r.name} val",
        )
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="Loss")
    _tight_ylim(ax, runs)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    return fig


def _tight_ylim(ax, runs: list[Run]) -> None:
    """Skip the first steps' near-log(V) loss so that the end of training is readable."""
    losses = [x["loss"] for r in runs for x in r.train_rows[len(r.train_rows) // 5 :]]
    losses += [x["val_loss"] for r in runs for x in r.eval_rows]
    finite = [v for v in losses if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))


def plot_maxvio_batch(runs: list[Run], *, trials: int = 200) -> Figure:
    """MaxVio_batch per step (mean over layers and micro-batches), log-y, with the sampling floor
    of uniform routing for the runs' batch size (:func:`sampling_maxvio`) as a dashed line."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = _colors(runs)
    moe = [r for r in runs if r.is_moe]
    for r in moe:
        rows = [x for x in r.train_rows if "maxvio_batch" in x]
        ax.plot(
            [x["step"] for x in rows],
            [max(x["maxvio_batch"], 1e-3) for x in rows],
            color=colors[r.name],
            label=r.name,
        )
    for T, E, K in sorted({(r.batch_tokens, r.num_experts, r.top_k) for r in moe}):
        if T and E:
            floor = sampling_maxvio(T, E, K, trials)
            ax.axhline(
                floor,
                color="k",
                ls="--",
                lw=1,
                label=f"uniform-routing floor, T={T}, E={E}, k={K}: {floor:.2f}",
            )
    ax.set_yscale("log")
    ax.set(
        xlabel="optimizer step",
        ylabel="MaxVio_batch (0 = perfect)",
        title="Load imbalance of each computation batch",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _grid(n: int, width: float = 4.2, height: float = 3.6) -> tuple[Figure, list]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols + 1.2, height * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_load_heatmap(runs: list[Run]) -> Figure:
    """Per-layer share of slots per expert (L × E) at the final evaluation, one panel per MoE
    run, one colour scale centred (white) on the uniform share 1/E."""
    data = [(r, s) for r in runs if (s := load_shares_LE(r)) is not None]
    fig, axes = _grid(max(1, len(data)))
    if not data:
        axes[0].text(0.5, 0.5, "no MoE evaluation yet", ha="center")
        return fig
    E = data[0][1].shape[1]
    vmax = max(float(s.max()) for _, s in data)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0 / E, vmax=max(vmax, 1.5 / E))
    for ax, (r, s) in zip(axes, data, strict=True):
        im = ax.imshow(s, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        ax.set(title=r.name, xlabel="expert", ylabel="MoE layer")
        ax.set_yticks(range(s.shape[0]))
    cbar = fig.colorbar(im, ax=axes)
    cbar.set_label(f"share of slots (uniform = 1/E = {1 / E:.3f}, white)")
    cbar.ax.axhline(1.0 / E, color="k", lw=1)
    fig.suptitle("Expert load at the final evaluation (validation split)")
    return fig


def plot_dead_experts(runs: list[Run]) -> Figure:
    """Dead experts summed over layers per step (no token in the tracker's window)."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    colors = _colors(runs)
    for r in (r for r in runs if r.is_moe):
        steps, dead = _dead_series(r)
        ax.step(steps, dead, where="post", color=colors[r.name], label=r.name)
    total = max(
        (
            r.num_experts * len(_get(r.final_eval, "counts_layers", []) or [0])
            for r in runs
            if r.is_moe
        ),
        default=0,
    )
    ax.set(
        xlabel="optimizer step",
        ylabel="dead experts (all layers)",
        title=f"Experts that got no token in the last 100 steps (of {total})",
    )
    ax.set_ylim(bottom=-0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def domain_names(run: Run) -> list[str]:
    """Domain names in corpus order, from the ``val_loss/<domain>`` keys of the evaluation."""
    return [k.split("/", 1)[1] for k in run.final_eval if k.startswith("val_loss/")]


def plot_domain_experts(runs: list[Run], layer: int = -1) -> Figure:
    """Domain → expert frequency P(expert | domain) (D × E) of one MoE layer, one panel per run
    (specialisation; the MI column of the table summarises it)."""
    data = [
        (r, np.asarray(f[layer])) for r in runs if (f := r.final_eval.get("domain_freq_layers"))
    ]
    fig, axes = _grid(max(1, len(data)), height=2.6)
    if not data:
        axes[0].text(0.5, 0.5, "no MoE evaluation yet", ha="center")
        return fig
    vmax = max(float(f.max()) for _, f in data)
    for ax, (r, f_DE) in zip(axes, data, strict=True):
        im = ax.imshow(f_DE, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        names = domain_names(r)
        ax.set_yticks(range(f_DE.shape[0]))
        ax.set_yticklabels(
            names if len(names) == f_DE.shape[0] else range(f_DE.shape[0]), fontsize=7
        )
        ax.set(
            title=f"{r.name} (MI {r.final_eval.get('mi', float('nan')):.2f} bits)", xlabel="expert"
        )
    fig.colorbar(im, ax=axes).set_label("P(expert | domain)")
    fig.suptitle(f"Which experts each domain uses (MoE layer {layer % _num_layers(data)})")
    return fig


def _num_layers(data) -> int:
    return len(data[0][0].final_eval["domain_freq_layers"])


# ----------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Plot:
    """One figure of the report: its file name, heading and a caption saying what to look for."""

    file: str
    title: str
    caption: str


PLOTS = [
    Plot(
        "loss.png",
        "Loss",
        "Training loss (lines) and validation loss (markers). Balancing "
        "should cost little or no loss; the dense twin has the same active parameters.",
    ),
    Plot(
        "maxvio_batch.png",
        "MaxVio_batch over training",
        "Imbalance of each computation "
        "batch, log scale. The dashed line is the floor that even perfectly uniform random "
        "routing shows at this batch size: a run on the line is as balanced as it can be.",
    ),
    Plot(
        "load_heatmap.png",
        "Expert load per layer",
        "Share of slots each expert got on the "
        "validation split. White = fair share 1/E, red = overloaded, blue = starved.",
    ),
    Plot(
        "dead_experts.png",
        "Dead experts",
        "Experts that received no token at all in the last 100 steps, summed over layers.",
    ),
    Plot(
        "domain_experts.png",
        "Domain → expert",
        "Which experts each data domain uses in the "
        "last MoE layer; MI in bits (0 = no specialisation).",
    ),
]


def make_figures(runs: list[Run]) -> dict[str, Figure]:
    """All report figures, keyed by file name (see :data:`PLOTS`)."""
    return {
        "loss.png": plot_loss(runs),
        "maxvio_batch.png": plot_maxvio_batch(runs),
        "load_heatmap.png": plot_load_heatmap(runs),
        "dead_experts.png": plot_dead_experts(runs),
        "domain_experts.png": plot_domain_experts(runs),
    }


def floor_table(num_experts: int, top_k: int, batch_tokens: list[int]) -> str:
    """Markdown table: tokens per expert and the MaxVio floor (simulated, approx) per batch."""
    lines = [
        "| batch tokens T | tokens per expert T·k/E | floor (simulated) | sqrt(2 ln E·E/(T·k)) |",
        "|---|---|---|---|",
    ]
    for T in batch_tokens:
        trials = int(min(200, max(20, 4e6 // (T * top_k))))
        sim = sampling_maxvio(T, num_experts, top_k, trials)
        approx = maxvio_floor_approx(T, num_experts, top_k)
        lines.append(f"| {T:,} | {T * top_k / num_experts:,.0f} | {sim:.3f} | {approx:.3f} |")
    return "\n".join(lines)


def how_to_read(runs: list[Run]) -> str:
    """Markdown: how to tell whether experts are balanced and what batch size is needed."""
    moe = [r for r in runs if r.is_moe and r.num_experts]
    E, K, T = (moe[0].num_experts, moe[0].top_k, moe[0].batch_tokens) if moe else (16, 2, 2048)
    per_expert = T * K / E
    need = 2 * math.log(E) * E / (K * 0.2**2)
    sizes = sorted({256, 1024, 4096, 16384, 65536, T})
    return f"""## How to read this: are my experts balanced, and what batch size do I need?

- **MaxVio_global** (table) is (max_i c_i − mean c) / mean c of the slot counts c_i summed over
  the whole validation split (Wang et al. 2024, eq. 4). **Near 0 = balanced over the data**;
  1.0 means the busiest expert gets twice its fair share. This says whether every expert is used.
- **MaxVio_batch** (second plot) is the same number on each computation batch (one micro-batch
  on one rank). It is what the hardware feels: the busiest expert sets the step time
  (stragglers), and with a capacity factor it is where tokens get dropped.
- **Tokens per expert per step = batch tokens · k / E.** Here T = {T:,} tokens, k = {K},
  E = {E}: **{per_expert:,.0f} tokens per expert** per computation batch.
- The share of slots f_i that an expert gets in one batch is a noisy statistic: even perfectly
  uniform random routing shows MaxVio_batch ≈ sqrt(2 ln E · E / (T·k)) from sampling alone
  (the dashed line, simulated with `moelab.report.sampling_maxvio`). A run at the dashed line
  is as balanced as a batch of that size can be; more balancing cannot push it lower, only a
  bigger batch can. Below a few hundred tokens per expert the per-batch numbers are mostly
  noise: judge balance by MaxVio_global then.
- **What batch size do I need?** For a floor of 0.2 with E = {E}, k = {K}:
  T ≥ 2 ln E · E / (k · 0.2²) ≈ {need:,.0f} tokens per computation batch (the formula is a
  little pessimistic for small E; the simulated column is the reference).

{floor_table(E, K, sizes)}

- **Collapse** shows as MaxVio_global of several (up to E − 1 = {E - 1}), red cells concentrated
  on a few experts in the heatmap, blue columns (starved experts: under a tenth of the fair
  share) and dead experts (no token for 100 steps). A balanced run has a near-white heatmap.
"""


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
]


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def markdown_to_html(md: str) -> str:
    """The small Markdown subset the report writes: ``#`` headings, ``-`` lists (with indented
    continuation lines), pipe tables and paragraphs, with inline code and bold."""
    blocks, out = re.split(r"\n\s*\n", md.strip()), []
    for block in blocks:
        lines = block.splitlines()
        if lines[0].startswith("#"):
            level = len(lines[0]) - len(lines[0].lstrip("#"))
            out.append(f"<h{level}>{_inline_html(lines[0][level:].strip())}</h{level}>")
        elif lines[0].startswith("|"):
            rows = [
                [c.strip() for c in ln.strip("|").split("|")]
                for ln in lines
                if not re.fullmatch(r"\|?[-| :]+\|?", ln)
            ]
            head = "".join(f"<th>{_inline_html(c)}</th>" for c in rows[0])
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>"
                for r in rows[1:]
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif lines[0].startswith("- "):
            items = re.split(r"\n- ", "\n" + block)[1:]
            out.append(
                "<ul>"
                + "".join(f"<li>{_inline_html(' '.join(i.split()))}</li>" for i in items)
                + "</ul>"
            )
        else:
            out.append(f"<p>{_inline_html(' '.join(block.split()))}</p>")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;
padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}
code{background:#f3f3f3;padding:0 3px}"""


def write_report(
    runs: dict[str, str | Path], out_dir: str | Path, title: str, intro_markdown: str = ""
) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained: PNGs as base64) and ``report.md`` (PNGs beside
    it) plus the PNGs into ``out_dir``; returns (html path, md path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(runs)
    for name, fig in make_figures(loaded).items():
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
    table = summary_table(loaded)
    guide = how_to_read(loaded)
    md = _markdown(title, intro_markdown, table, guide)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(
        _html(title, intro_markdown, table, guide, out), encoding="utf-8"
    )
    return out / "report.html", out / "report.md"


_TABLE_NOTE = (
    "MaxVio_batch (end): mean of the last 5 logged steps. Dead: no token in the last "
    "100 steps (end of training); starved: under a tenth of the fair share 1/E on "
    "the validation split. MI: domain → expert mutual information, mean over layers."
)


def _markdown(title: str, intro: str, table: list[dict], guide: str) -> str:
    parts = [f"# {title}", intro, "## Summary", table_markdown(table), _TABLE_NOTE]
    for p in PLOTS:
        parts += [f"## {p.title}", f"![{p.title}]({p.file})", p.caption]
    parts.append(guide)
    return "\n\n".join(s for s in parts if s) + "\n"


def _html(title: str, intro: str, table: list[dict], guide: str, out: Path) -> str:
    figures = []
    for p in PLOTS:
        data = base64.b64encode((out / p.file).read_bytes()).decode("ascii")
        figures.append(
            f'<h2>{html.escape(p.title)}</h2><figure><img alt="{p.file}" '
            f'src="data:image/png;base64,{data}"><figcaption>'
            f"{_inline_html(p.caption)}</figcaption></figure>"
        )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"{markdown_to_html(intro) if intro else ''}<h2>Summary</h2>{table_html(table)}"
        f"<p><small>{_inline_html(_TABLE_NOTE)}</small></p>{''.join(figures)}"
        f"{markdown_to_html(guide)}</body></html>\n"
    )
