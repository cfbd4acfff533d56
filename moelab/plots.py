"""The report's figures over run folders: each ``plot_*`` takes ``list[Run]`` and returns a
matplotlib Figure (Agg backend), so the demo and the experiment suite share them.

Legend: L MoE layers, E experts, K top-k, D domains, T tokens per computation batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from moelab.runs import Run, dead_series, dotted_get, load_shares_LE, sampling_maxvio  # noqa: E402


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
        steps, dead = dead_series(r)
        ax.step(steps, dead, where="post", color=colors[r.name], label=r.name)
    total = max(
        (
            r.num_experts * len(dotted_get(r.final_eval, "counts_layers", []) or [0])
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


def plot_routing_across(runs: list[Run]) -> Figure:
    """Per MoE layer: training-vs-inference routing consistency (left) and how well the top-1
    expert predicts the next layer's top-1, against the constant-guess baseline (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = _colors(runs)
    for r in (r for r in runs if r.is_moe):
        ev = r.final_eval
        cons = dotted_get(ev, "routing_consistency_layers", None)
        if cons:
            left.plot(range(len(cons)), cons, "o-", color=colors[r.name], label=r.name)
        pred = dotted_get(ev, "next_layer_predict_layers", None)
        base = dotted_get(ev, "next_layer_base_layers", None)
        if pred:
            right.plot(range(len(pred)), pred, "o-", color=colors[r.name], label=r.name)
            right.plot(range(len(base)), base, ":", color=colors[r.name])
    left.set(xlabel="MoE layer", ylabel="share of choices kept", ylim=(0, 1.05),
             title="Training vs inference routing")  # fmt: skip
    right.set(xlabel="MoE layer l (predicts l + 1)", ylabel="top-1 accuracy", ylim=(0, 1.05),
              title="Next-layer predictability (dotted: baseline)")  # fmt: skip
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines:
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
    Plot(
        "routing_across.png",
        "Routing across forwards and layers",
        "Left: share of the inference forward's expert choices that the training forward of "
        "the same tokens also makes (1 = no train/inference mismatch; router noise and expert "
        "masking lower it). Right: accuracy of predicting a token's top-1 expert in the next "
        "MoE layer from its top-1 in this one, against always guessing the busiest expert "
        "(dotted); far above the dotted line, the next layer's load is known a layer ahead.",
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
        "routing_across.png": plot_routing_across(runs),
    }
