"""One optimizer step of the trainer: forward/backward over the micro-batches (gradient
accumulation), gradient sync and clipping, the LR schedule, the update, and what the step
measured (``StepResult``). ``moelab.train`` runs it in its loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab import device
from moelab.errors import RunError
from moelab.host import FiniteChecks, deferred_finite_checks, to_host
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
    """What one optimizer step measured (detached). ``loss``, ``aux`` and ``grad_norm`` are
    read to the host every step (they decide whether the step is applied); the per-layer
    statistics stay tensors on the run's device until the logger reads them (``dropped``,
    ``z``: one host read each, on logged steps only)."""

    loss: float
    aux: float
    grad_norm: float
    skipped: bool
    micro_counts: list[list[Tensor]]  # [micro][layer] (E,) counts
    kept: list[Tensor]  # [layer] (E,) kept slots over the step
    dropped_micro: list[Tensor]  # [micro] 0-dim dropped slots summed over layers
    z_micro: list[Tensor]  # [micro] (layers,) z of the logits
    expert_grad_norms: list[Tensor]
    moe_stats: list[list[dict[str, Tensor]]] = field(default_factory=list)  # [micro][layer]
    nonfinite: str = ""  # what was not finite when ``skipped``
    train_eval_gap: float | None = None  # see TrainConfig.train_eval_gap

    def step_counts(self) -> list[Tensor]:
        """[layer] (E,) slots routed per expert, summed over the step's micro-batches."""
        return [sum(mc[i] for mc in self.micro_counts) for i in range(len(self.kept))]

    @property
    def dropped(self) -> int:
        """Slots dropped over the step, all layers (one host read)."""
        if not self.dropped_micro:
            return 0
        return int(to_host(torch.stack(self.dropped_micro).sum(), "dropped slots"))

    @property
    def z(self) -> list[float]:
        """[layer] z of the logits, the mean over micro-batches (one host read)."""
        if not self.z_micro:
            return []
        n, rows = len(self.z_micro), to_host(torch.stack(self.z_micro), "z of the logits")
        z = [v / n for v in rows[0]]
        for row in rows[1:]:  # summed in micro-batch order, as logged before
            z = [a + v / n for a, v in zip(z, row, strict=True)]
        return z


@dataclass
class _Micro:
    """What the micro-batches of one step leave, as tensors on the run's device."""

    losses: list[Tensor] = field(default_factory=list)  # [micro] 0-dim LM loss
    auxes: list[Tensor] = field(default_factory=list)  # [micro] 0-dim weighted balance loss
    counts: list[list[Tensor]] = field(default_factory=list)
    stats: list[list[dict[str, Tensor]]] = field(default_factory=list)
    kept: list[Tensor] | None = None
    dropped: list[Tensor] = field(default_factory=list)
    z: list[Tensor] = field(default_factory=list)

    def add(self, out) -> None:
        """Keep one micro-batch's (detached) loss, aux and per-layer statistics."""
        self.losses.append(out.loss.detach())
        self.auxes.append(out.aux.detach())
        self.counts.append([o.counts for o in out.moe])
        self.stats.append([o.stats for o in out.moe])
        k_now = [o.kept for o in out.moe]
        if self.kept is not None:
            k_now = [a + b for a, b in zip(self.kept, k_now, strict=True)]
        self.kept = k_now
        if out.moe:
            self.dropped.append(torch.stack([o.dropped for o in out.moe]).sum())
            self.z.append(torch.stack([o.stats["z"] for o in out.moe]))

    def read_losses(self, checks: FiniteChecks) -> tuple[list[float], float, float]:
        """One host read: the micro-batch losses, the step's mean loss and aux (summed in Python
        in micro-batch order, the numbers the trainer always logged) and the deferred router
        checks (NonFiniteRouterError naming the first layer whose logits were not finite)."""
        flags = [f.float() for _, f in checks.flags]
        vals = to_host(torch.stack([*self.losses, *self.auxes, *flags]).float(), "step losses")
        n = len(self.losses)
        failed = checks.failed([v == 1.0 for v in vals[2 * n :]])
        if failed:
            raise NonFiniteRouterError(failed[0])
        loss_sum = aux_sum = 0.0
        for loss, aux in zip(vals[:n], vals[n : 2 * n], strict=True):
            loss_sum += loss / n
            aux_sum += aux / n
        return vals[:n], loss_sum, aux_sum

    def result(self, loss: float, aux: float, gnorm: float, egn: list, gap) -> StepResult:
        return StepResult(
            loss, aux, gnorm, False, self.counts, self.kept or [], self.dropped, self.z, egn,
            self.stats, train_eval_gap=gap,
        )  # fmt: skip


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
    Batches move to the model's device; ``train.dtype = "bf16"`` autocasts on its type.
    ``measure_gap``: also measure ``train_eval_gap`` (before the update; the trainer asks on
    logged steps when ``train.train_eval_gap`` is on). Two host reads per step: the losses
    and the gradient norm (:mod:`moelab.host`)."""
    acc = _Micro()
    try:
        with deferred_finite_checks() as checks:
            for mb in micro:
                out = _forward(model, mb, cfg)
                ((out.loss + out.aux) / len(micro)).backward()
                acc.add(out)
        losses, loss_sum, aux_sum = acc.read_losses(checks)
    except NonFiniteRouterError as exc:
        return _nonfinite(model, opt, cfg, step, exc.what)
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
    return acc.result(loss_sum, aux_sum, gnorm, egn, gap)


def _forward(model: MoELM, mb, cfg: RunConfig):
    """The model on micro-batch ``mb``, moved to the model's device, under ``train.dtype``."""
    dev = device.of(model)
    with device.autocast(cfg.train.dtype, dev):
        return model(mb.tokens.to(dev, non_blocking=True), mb.targets.to(dev, non_blocking=True))


@torch.no_grad()
def _train_eval_gap(model: MoELM, mb, train_loss: float, cfg: RunConfig, world: World) -> float:
    """Inference-mode loss of micro-batch ``mb`` minus its training-mode loss (same weights),
    averaged over ranks. The eval forward draws no random numbers and updates no state."""
    model.eval()
    try:
        out = _forward(model, mb, cfg)
    finally:
        model.train()
    return world.mean(float(to_host(out.loss, "train/eval gap loss")) - train_loss)


def _nonfinite(model: MoELM, opt: torch.optim.Optimizer, cfg: RunConfig, step: int, what: str):
    """``stop``: raise NonFiniteError naming ``what`` and the step. ``skip``: drop the step
    (no optimizer step, gradients and balance accumulators cleared) and say so."""
    if cfg.train.nonfinite == "stop":
        raise NonFiniteError(
            f"{what} at step {step + 1}; set train.nonfinite='skip' to skip such steps"
        )
    model.reset_step()
    opt.zero_grad(set_to_none=True)
    return StepResult(math.nan, math.nan, math.nan, True, [], [], [], [], [], nonfinite=what)
