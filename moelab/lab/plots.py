"""Matplotlib figures of the lab (Agg backend; every function returns a Figure)."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def training_curves(curves: dict[str, dict[str, list]]) -> Figure:
    """Loss, MaxVio_batch and dead experts (window) over steps, one line per variant."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, c in curves.items():
        axes[0].plot(c["step"], c["loss"], label=name)
        axes[1].plot(c["step"], c["maxvio_batch"], label=name)
        axes[2].plot(c["step"], c["dead"], label=name)
    for ax, t in zip(
        axes, ("train loss", "MaxVio_batch", "dead experts (window, all layers)"), strict=True
    ):
        ax.set_title(t)
        ax.set_xlabel("step")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def pareto(table: dict[str, dict[str, Any]]) -> Figure:
    """Balance (MaxVio_global) vs quality (val loss), mean ± std over seeds."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, m in table.items():
        if "maxvio_global" not in m or "val_loss" not in m:
            continue
        x, y = m["maxvio_global"], m["val_loss"]
        xerr, yerr = x.get("std") or 0.0, y.get("std") or 0.0  # None at one seed
        ax.errorbar(x["mean"], y["mean"], xerr=xerr, yerr=yerr, fmt="o", capsize=3)
        ax.annotate(
            name, (x["mean"], y["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.set_xlabel("MaxVio_global (log)")
    ax.set_ylabel("validation loss")
    ax.set_title("balance vs quality")
    fig.tight_layout()
    return fig


def chunk_plot(res: dict[str, Any], ylabel: str = "MaxVio over chunks") -> Figure:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    sizes = res["sizes"]
    for name, r in res.items():
        if isinstance(r, dict) and "curve" in r:
            ax.plot(r.get("sizes", sizes), r["curve"], "o-", label=name)
    ax.plot(sizes, res["reference"], "k--", label="random balanced router (∝1/√n)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("computation batch (tokens)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def heatmaps(heat: dict[str, tuple[list[str], np.ndarray]]) -> Figure:
    """Per-domain expert frequency of the last MoE layer, one panel per variant."""
    n = len(heat)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 2.8), squeeze=False)
    for ax, (name, (domains, f_DE)) in zip(axes[0], heat.items(), strict=True):
        im = ax.imshow(f_DE, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(domains)), [d[:14] for d in domains], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def batch_plot(res: dict[str, dict[str, Any]]) -> Figure:
    names = list(res)
    bt = [res[n]["batch_tokens"] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(bt, [res[n]["f_spread"] for n in names], "o-", label="std of f_i")
    axes[0].plot(bt, [res[n]["drop_cf125"] for n in names], "s-", label="drop rate @CF1.25")
    axes[0].plot(
        bt, [res[n]["reference_maxvio"] for n in names], "k--", label="random-router MaxVio"
    )
    axes[1].plot(bt, [res[n].get("grad_cos", np.nan) for n in names], "o-", label="cos(g_t, g_t+1)")
    axes[1].plot(
        bt, [res[n].get("grad_rel_var", np.nan) for n in names], "s-", label="rel. variance"
    )
    for n in names:
        if "saturation" in res[n]:
            axes[2].plot(res[n]["snapshot_steps"], res[n]["saturation"], "o-", label=n)
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (tokens)")
        ax.legend(fontsize=7)
    axes[2].set_title("router saturation vs final")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig


def fluctuation_plot(res: dict[str, dict[str, Any]]) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in res.items():
        if "snapshot_steps" not in r:
            continue
        steps = np.asarray(r["snapshot_steps"]) / r["snapshot_steps"][-1]
        axes[0].plot(steps, np.cumsum(r["last_change_hist"]), "o-", label=name)
        axes[1].plot(steps, r["saturation"], "o-", label=name)
    axes[0].set_title("CDF of last-change step")
    axes[1].set_title("router saturation (top-k overlap with final)")
    for ax in axes:
        ax.set_xlabel("fraction of training")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def leakage_plot(res: dict[str, Any]) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = [n for n, r in res.items() if isinstance(r, dict)]
    modes = ("whole", "contig", "shuffled")
    w = 0.25
    for i, mode in enumerate(modes):
        ax.bar(np.arange(len(names)) + i * w, [res[n][mode] for n in names], w, label=mode)
    ax.set_xticks(np.arange(len(names)) + w, names, fontsize=8)
    ax.set_ylabel(f"val loss (routing chunk {res['chunk']} tokens)")
    lo = min(res[n][m] for n in names for m in modes)
    ax.set_ylim(lo * 0.95, None)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save(fig: Figure, path) -> None:
    fig.savefig(path, dpi=80)
    plt.close(fig)


def noise_plot(runs: dict[str, list]) -> Figure:
    """Per-seed values of val loss and MaxVio_global of every arm (one dot per seed)."""
    from moelab.lab.runner import collect

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(runs)
    for i, name in enumerate(names):
        nums = [collect(d) for d in runs[name]]
        for ax, key in zip(axes, ("val_loss", "maxvio_global"), strict=True):
            vals = [x[key] for x in nums if isinstance(x.get(key), (int, float))]
            ax.plot([i] * len(vals), vals, "o", alpha=0.6)
    for ax, t in zip(axes, ("val loss per seed", "MaxVio_global per seed"), strict=True):
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_title(t)
    fig.tight_layout()
    return fig
