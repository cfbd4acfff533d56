"""Run folders read back: config, summary and metrics rows, and the numbers a report shows.

``load_run`` reads a folder written by ``moelab train`` (metrics.jsonl, summary.json,
config.json); ``summary_row`` gives its end-of-run numbers; ``sampling_maxvio`` is the MaxVio
that perfectly uniform random routing shows on a batch of T tokens, the floor a run is read
against.

Legend: L MoE layers, E experts, K top-k, N trials, T tokens per computation batch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.logs import read_rows

STARVED_SHARE = 0.1  # an expert with under a tenth of its fair share 1/E counts as starved


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
        return int(dotted_get(self.config, "model.moe.num_experts", 0) or 0)

    @property
    def top_k(self) -> int:
        return int(dotted_get(self.config, "model.moe.top_k", 1) or 1)

    @property
    def batch_tokens(self) -> int:
        """Tokens per computation batch T: one micro-batch (per rank) of sequences."""
        train = self.config.get("train", {})
        seqs = train.get("micro_batch_size") or train.get("batch_size", 0)
        return int(seqs) * int(dotted_get(self.config, "data.seq_len", 0) or 0)


def dotted_get(d: dict, dotted: str, default: Any = None) -> Any:
    """d["a"]["b"] for dotted = "a.b"; ``default`` where a key is missing."""
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


def dead_series(run: Run) -> tuple[list[int], list[int]]:
    """Steps and dead experts summed over layers (the windowed count where logged)."""
    key = "dead_window_layers" if any("dead_window_layers" in r for r in run.train_rows) else None
    key = key or "dead_layers"
    rows = [r for r in run.train_rows if key in r]
    return [r["step"] for r in rows], [int(sum(r[key])) for r in rows]


def summary_row(run: Run, tail: int = 5) -> dict[str, Any]:
    """One table row: the end-of-run numbers of a run (None where it does not apply)."""
    ev, last = run.final_eval, (run.train_rows[-1] if run.train_rows else {})
    mv_tail = [r["maxvio_batch"] for r in run.train_rows if "maxvio_batch" in r][-tail:]
    shares = load_shares_LE(run)
    _, dead = dead_series(run)
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
