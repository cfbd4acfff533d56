"""One optimizer step of the trainer: forward/backward over the micro-batches (gradient
accumulation), gradient sync and clipping, the LR schedule, the update, and what the step
measured (``StepResult``). ``moelab.train`` runs it in its loop and re-exports these names.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.errors import RunError
from moelab.model import MoELM
from moelab.routing import NonFiniteRouterError
from moelab.runconfig import RunConfig, TrainConfig
from moelab.world import World


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr·min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    )


class NonFiniteError(RunError):
    """NaN or inf router logits, loss or gradient with ``train.nonfinite = "stop"``."""


@dataclass
class StepResult:
    """What one optimizer step measured (detached)."""

    loss: float
    aux: float
    grad_norm: float
    skipped: bool
    micro_counts: list[list[Tensor]]  # [micro][layer] (E,) counts
    kept: list[Tensor]  # [layer] (E,) kept slots over the step
    dropped: int
    z: list[float]
    expert_grad_norms: list[Tensor]
    moe_stats: list[list[dict[str, Tensor]]] = field(default_factory=list)  # [micro][layer]
    nonfinite: str = ""  # what was not finite when ``skipped``
    train_eval_gap: float | None = None  # see TrainConfig.train_eval_gap

    def step_counts(self) -> list[Tensor]:
        """[layer] (E,) slots routed per expert, summed over the step's micro-batches."""
        return [sum(mc[i] for mc in self.micro_counts) for i in range(len(self.kept))]


def train_step(
    model: MoELM,
    opt: torch.optim.Optimizer,
    micro: list,
    cfg: RunConfig,
    world: World,
    step: int,
    *,
    measure_gap: bool = False,
) -> StepResult:
    """Forward/backward over the micro-batches, clip, step; balance state updated after.
    ``measure_gap``: also measure ``train_eval_gap`` (before the update; the trainer asks on
    logged steps when ``train.train_eval_gap`` is on)."""
    n = len(micro)
    loss_sum = aux_sum = 0.0
    micro_counts, kept, dropped, z, stats, losses = [], None, 0, None, [], []
    for mb in micro:
        try:
            with _autocast(cfg.train.dtype):
                out = model(mb.tokens, mb.targets)
        except NonFiniteRouterError as exc:
            return _nonfinite(model, opt, cfg, step, exc.what)
        ((out.loss + out.aux) / n).backward()
        losses.append(float(out.loss.detach()))
        loss_sum += losses[-1] / n
        aux_sum += float(out.aux.detach()) / n
        micro_counts.append([o.counts for o in out.moe])
        stats.append([o.stats for o in out.moe])
        k_now = [o.kept for o in out.moe]
        kept = k_now if kept is None else [a + b for a, b in zip(kept, k_now, strict=True)]
        dropped += sum(int(o.dropped) for o in out.moe)
        z_now = [float(o.stats["z"]) / n for o in out.moe]
        z = z_now if z is None else [a + b for a, b in zip(z, z_now, strict=True)]
    gap = _train_eval_gap(model, micro[0], losses[0], cfg, world) if measure_gap else None
    world.sync_grads(model)
    egn = [layer.experts.grad_norm() for layer in model.moe_layers]
    gnorm = world.clip_grad_norm(model, cfg.train.grad_clip)
    loss_sum = world.mean(loss_sum)
    if not (math.isfinite(loss_sum) and math.isfinite(gnorm)):
        return _nonfinite(
            model, opt, cfg, step, f"non-finite loss ({loss_sum}) or gradient norm ({gnorm})"
        )
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg.train)
    opt.step()
    model.end_step(cfg.train.steps)
    opt.zero_grad(set_to_none=True)
    return StepResult(
        loss_sum,
        aux_sum,
        gnorm,
        False,
        micro_counts,
        kept or [],
        dropped,
        z or [],
        egn,
        stats,
        train_eval_gap=gap,
    )


@torch.no_grad()
def _train_eval_gap(model: MoELM, mb, train_loss: float, cfg: RunConfig, world: World) -> float:
    """Inference-mode loss of micro-batch ``mb`` minus its training-mode loss (same weights),
    averaged over ranks. The eval forward draws no random numbers and updates no state."""
    model.eval()
    try:
        with _autocast(cfg.train.dtype):
            out = model(mb.tokens, mb.targets)
    finally:
        model.train()
    return world.mean(float(out.loss) - train_loss)


def _nonfinite(model: MoELM, opt: torch.optim.Optimizer, cfg: RunConfig, step: int, what: str):
    """``stop``: raise NonFiniteError naming ``what`` and the step. ``skip``: drop the step
    (no optimizer step, gradients and balance accumulators cleared) and say so."""
    if cfg.train.nonfinite == "stop":
        raise NonFiniteError(
            f"{what} at step {step + 1}; set train.nonfinite='skip' to skip such steps"
        )
    model.reset_step()
    opt.zero_grad(set_to_none=True)
    return StepResult(math.nan, math.nan, math.nan, True, [], [], 0, [], [], nonfinite=what)


def _autocast(dtype: str):
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
