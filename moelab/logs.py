"""metrics.jsonl + TensorBoard logging and the per-step row the trainer writes."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelab import metrics

if TYPE_CHECKING:
    from torch import Tensor


class MetricsLog:
    """Append JSON rows to ``DIR/metrics.jsonl`` (and scalars to TensorBoard under DIR/tb).

    ``truncate_after``: on resume, drop rows with ``step`` beyond the checkpoint so that the
    log reads as one uninterrupted run (rewritten atomically); a torn last line (a crash or a
    full disk mid-append) is dropped with a one-line note naming the file.
    """

    def __init__(
        self, out: Path, *, enabled: bool = True, tensorboard: bool = True, truncate_after: int = 0
    ) -> None:
        self.enabled, self.path, self.tb = enabled, Path(out) / "metrics.jsonl", None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after and self.path.exists():
            rows, torn = _parse(self.path)
            if torn:
                print(f"moelab: dropped a torn last line of {str(self.path)!r}", file=sys.stderr)
            keep = [r for r in rows if r.get("step", 0) <= truncate_after]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
            os.replace(tmp, self.path)
        elif not truncate_after:
            self.path.write_text("")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tb"))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file; a torn last line (a write in progress or cut short)
    is left out, a malformed line before it raises ValueError naming the file and line."""
    return _parse(Path(path))[0]


def _parse(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(rows, whether a torn last line was left out) of a metrics.jsonl file."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows, torn = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif not any(x.strip() for x in lines[i + 1 :]):
            torn = True  # the last line: a crash mid-append
        else:
            raise ValueError(f"{str(path)!r} line {i + 1} is not a JSON row; the log is damaged")
    return rows, torn


def step_row(step: int, r, model, trackers, lr: float, tokens: int, tok_s: float) -> dict:
    """The training row: loss and per-layer balance statistics of this optimizer step.

    maxvio_batch: MaxVio of each micro-batch (the computation batch), averaged over micro-
    batches and layers; maxvio_step: MaxVio of the optimizer step's counts summed over its
    micro-batches (the global batch), averaged over layers; ``*_layers`` lists are per MoE
    layer in depth order.
    """
    row: dict[str, Any] = {
        "step": step,
        "loss": r.loss,
        "aux": r.aux,
        "lr": lr,
        "grad_norm": r.grad_norm,
        "tokens": tokens,
        "tokens_per_s": tok_s,
    }
    if r.skipped:
        row["skipped"] = True
    if r.train_eval_gap is not None:
        row["train_eval_gap"] = r.train_eval_gap
    layers = model.moe_layers
    if not layers:
        return row
    counts = r.step_counts()
    row |= _load_stats(r, counts, layers, trackers)
    row |= _routing_stats(r.moe_stats, len(layers))
    return row | _router_stats(layers, counts)


def _load_stats(r, counts: list[Tensor], layers, trackers) -> dict[str, Any]:
    """Per-layer load of the step's counts (E,) and micro-batch counts, and balancer state."""
    n_micro = len(r.micro_counts)
    mv = [
        sum(float(metrics.max_violation(mc[i])) for mc in r.micro_counts) / n_micro
        for i in range(len(layers))
    ]
    balance = [layer.balancer.stats() for layer in layers]
    total_slots = sum(int(c.sum()) for c in counts)
    mv_step = [float(metrics.max_violation(c)) for c in counts]
    row = {
        "maxvio_batch": sum(mv) / len(mv),
        "maxvio_batch_layers": mv,
        "maxvio_step": sum(mv_step) / len(mv_step),
        "cv_layers": [float(metrics.cv(c.float())) for c in counts],
        "dead_layers": [int(metrics.dead_experts(c).sum()) for c in counts],
        "dead_window_layers": [int(t.dead().sum()) for t in trackers],
        "since_hit_max_layers": [int(t.tokens_since_last_hit.max()) for t in trackers],
        "drop_rate": metrics.drop_rate(r.dropped, total_slots),
        "z_layers": r.z,
        "bias_absmean_layers": [b["bias_absmean"] for b in balance],
        "bias_range_layers": [b["bias_range"] for b in balance],
        "aux_coef_layers": [b["aux_coef"] for b in balance],
        "counts_layers": [c.tolist() for c in counts],
        "expert_grad_norm_layers": [[round(float(g), 6) for g in e] for e in r.expert_grad_norms],
    }
    row["dead"] = sum(row["dead_layers"])
    for key in ("l1_coef", "null_bias"):
        if key in balance[0]:
            row[f"{key}_layers"] = [b[key] for b in balance]
    return row


def _router_stats(layers, counts: list[Tensor]) -> dict[str, Any]:
    """Router weight similarity (cosine between experts' rows) and the top-quarter load share."""
    sims = [metrics.router_similarity(layer.router.weight) for layer in layers]
    quarter = [max(1, layer.cfg.num_experts // 4) for layer in layers]
    return {
        "router_cos_mean_layers": [s.mean for s in sims],
        "router_cos_max_layers": [s.max for s in sims],
        "top_quarter_share_layers": [
            float(metrics.top_n_share(c, n)) for c, n in zip(counts, quarter, strict=True)
        ],
    }


def _routing_stats(moe_stats: list, n_layers: int) -> dict[str, Any]:
    """Per-layer means over the step's micro-batches of the routing stats a layer reports
    only where a token's number of experts varies: ``experts_per_token``, ``no_expert``."""
    out: dict[str, Any] = {}
    for key in ("experts_per_token", "no_expert"):
        if moe_stats and moe_stats[0] and key in moe_stats[0][0]:
            out[f"{key}_layers"] = [
                sum(float(m[i][key]) for m in moe_stats) / len(moe_stats) for i in range(n_layers)
            ]
    return out
