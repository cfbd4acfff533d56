"""MoELayer: route -> balance losses -> dispatch -> experts -> combine.

Legend: T tokens, D model dim, E experts, K slots per token, B sequences, L sequence length.

The layer is usable inside any PyTorch model: ``MoELayer(cfg)(x)`` takes x of shape
(..., D) and returns an :class:`MoEOutput` whose ``output`` has the shape of x and whose
``losses`` hold every balance term already multiplied by its coefficient. Balance losses use
the routing *before* capacity drops (Switch's reading; Megatron-LM #1513).

The only state besides parameters is the explicit balance state, all buffers saved in
checkpoints: ``bias`` (E,) for loss-free balancing, ``step_counts`` (E,) accumulated over the
micro-batches of the current optimizer step, ``progress`` (optimizer steps taken, for
annealing schedules) and ``aux_coef`` (the live coefficient under adaptive-λ).
Call :meth:`MoELayer.end_step` after every optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import balance as bal
from moelab import dispatch
from moelab.config import MoEConfig
from moelab.experts import Experts, SharedExperts
from moelab.metrics import max_violation
from moelab.router import Router
from moelab.routing import Routing


class NonFiniteRouterError(ValueError):
    """The router logits of MoE layer ``layer`` contain NaN or inf (its input or its weights)."""

    def __init__(self, layer: int | None) -> None:
        self.layer = layer
        where = "an MoE layer" if layer is None else f"MoE layer {layer}"
        super().__init__(
            f"non-finite router logits (NaN or inf) in {where}; allowed: finite values "
            "(check the layer input, router.init_std and the learning rate)"
        )


@dataclass
class MoEOutput:
    """What one MoE layer call returns.

    output: same shape as the input. losses: name -> weighted 0-dim loss (already × coef).
    counts: (E,) slots routed per expert before drops; kept: (E,) after drops;
    dropped: 0-dim number of dropped slots. experts: (T, K) chosen experts (detached);
    slot_mask: (T, K) bool valid slots or None. stats: detached 0-dim diagnostics.
    """

    output: Tensor
    losses: dict[str, Tensor]
    counts: Tensor
    kept: Tensor
    dropped: Tensor
    experts: Tensor
    slot_mask: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)

    @property
    def aux_total(self) -> Tensor:
        """Sum of all weighted balance losses (0 if none are on)."""
        return sum(self.losses.values(), torch.zeros((), device=self.output.device))


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN layer configured by :class:`moelab.MoEConfig`."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E = cfg.num_experts
        self.router = Router(cfg.router, cfg.d_model, E, cfg.top_k)
        self.experts = Experts(
            E,
            cfg.d_model,
            cfg.d_expert,
            init_std=cfg.init_std,
            init=cfg.expert_init,
            dropout=cfg.expert_dropout,
        )
        self.shared = (
            SharedExperts(cfg.num_shared, cfg.d_model, cfg.shared_hidden, init_std=cfg.init_std)
            if cfg.num_shared
            else None
        )
        self.register_buffer("bias", torch.zeros(E))
        self.register_buffer("step_counts", torch.zeros(E, dtype=torch.int64))
        self.register_buffer("progress", torch.zeros((), dtype=torch.int64))
        self.register_buffer("aux_coef", torch.tensor(cfg.balance.aux_coef, dtype=torch.float32))
        # Set by moelab.parallel: all-reduce (E,) counts over the data-parallel ranks.
        self.reduce_counts: Callable[[Tensor], Tensor] | None = None
        # Set by the model: this layer's index among its MoE layers (named in errors).
        self.layer_index: int | None = None

    # ------------------------------------------------------------------ forward

    def forward(
        self, x: Tensor, *, token_ids: Tensor | None = None, mask: Tensor | None = None
    ) -> MoEOutput:
        """x (..., D) -> MoEOutput; token_ids (...) for hash routing; mask (...) bool, False =
        padding (excluded from routing statistics, losses and expert compute)."""
        D = self.cfg.d_model
        _check_inputs(x, D, token_ids=token_ids, mask=mask)
        x_TD = x.reshape(-1, D)
        mask_T = None if mask is None else mask.reshape(-1).to(torch.bool)
        routing = self._route(x_TD, None if token_ids is None else token_ids.reshape(-1))
        slot_mask_TK = _slot_mask(routing, mask_T)
        counts_E = _counts(routing.experts, slot_mask_TK, self.cfg.num_experts)
        # Counts of the whole computation batch (all data ranks under EP; one all-reduce).
        global_E = counts_E if self.reduce_counts is None else self.reduce_counts(counts_E)
        cap = self._capacity(x_TD.shape[0] if mask_T is None else int(mask_T.sum()))
        losses = self._losses(routing, counts_E, global_E, slot_mask_TK, mask_T, x.shape, cap)
        plan = self._plan(routing, slot_mask_TK, cap)
        y_TD = self._experts_forward(x_TD, plan)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if mask_T is not None:  # padding gets no FFN output at all
                shared_TD = shared_TD * mask_T.unsqueeze(1).to(shared_TD.dtype)
            y_TD = y_TD + shared_TD
        if self.training:
            self._accumulate(global_E)
        return MoEOutput(
            output=y_TD.reshape(x.shape),
            losses=losses,
            counts=counts_E,
            kept=plan.kept_E,
            dropped=plan.dropped,
            experts=routing.experts.detach(),
            slot_mask=slot_mask_TK,
            stats=self._stats(routing, mask_T),
        )

    def _route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        """The router's decision; NonFiniteRouterError (naming this layer) on NaN/inf logits."""
        try:
            return self.router(
                x_TD,
                bias=self.bias if self.cfg.balance.bias_rate > 0 else None,
                step=int(self.progress),
                token_ids=token_ids_T,
            )
        except ValueError as exc:
            # route() refuses non-finite logits; find out whether that was the cause.
            with torch.no_grad():
                clean_TE = F.linear(x_TD.float(), self.router.weight)
                tensors = (x_TD, clean_TE, *self.router.parameters())
                if all(bool(torch.isfinite(t).all()) for t in tensors):
                    raise
            raise NonFiniteRouterError(self.layer_index) from exc

    def _capacity(self, num_tokens: int) -> int:
        factor = self.cfg.capacity.factor_for(self.training)
        return dispatch.capacity(num_tokens, self.cfg.top_k, self.cfg.num_experts, factor)

    def _plan(self, routing: Routing, slot_mask_TK: Tensor | None, cap: int) -> dispatch.Plan:
        c = self.cfg.capacity
        if c.reroute and cap > 0 and routing.mask is None:
            return dispatch.plan_with_reroute(
                routing.experts,
                routing.weights,
                routing.scores,
                self.cfg.num_experts,
                capacity=cap,
                policy=c.policy,
                mask_TK=slot_mask_TK,
                normalize=self.cfg.router.normalize,
            )
        return dispatch.plan(
            routing.experts,
            routing.weights,
            self.cfg.num_experts,
            capacity=cap,
            policy=c.policy,
            mask_TK=slot_mask_TK,
        )

    def _experts_forward(self, x_TD: Tensor, plan: dispatch.Plan) -> Tensor:
        """Permute, run experts on contiguous segments, unpermute (overridden under EP).

        Single process: the three steps as one autograd node (``Experts.forward_tokens``),
        equal to ``unpermute(experts(permute(x)))`` with a third of the saved activations.
        """
        return self.experts.forward_tokens(x_TD, plan.token_S, plan.weight_S, plan.splits)

    # ------------------------------------------------------------------ balance

    def _losses(
        self,
        routing: Routing,
        counts_E: Tensor,
        global_E: Tensor,
        slot_mask_TK: Tensor | None,
        mask_T: Tensor | None,
        shape: torch.Size,
        cap: int,
    ) -> dict[str, Tensor]:
        """Every balance term with a non-zero coefficient, weighted (before capacity drops).

        counts_E: this rank's counts; global_E: the same summed over data ranks (``reduce_counts``).
        """
        b, E = self.cfg.balance, self.cfg.num_experts
        dist_TE = bal.score_distribution(routing.scores, self.cfg.router.score)
        probs_E = _masked_mean(dist_TE, mask_T)
        out: dict[str, Tensor] = {}
        if b.aux_coef > 0 or b.adaptive_target > 0:
            out["aux"] = self.aux_coef * self._scoped_aux(
                routing, counts_E, global_E, probs_E, mask_T, shape
            )
        if b.seq_aux_coef > 0:
            out["seq_aux"] = b.seq_aux_coef * self._sequence_aux(routing, mask_T, shape)
        if b.device_coef > 0:
            out["device"] = b.device_coef * bal.device_loss(
                counts=counts_E, probs=probs_E, num_devices=b.num_devices
            )
        if b.comm_coef > 0:
            hits_G = bal.device_hits(routing.experts, E, b.num_devices, mask=mask_T)
            out["comm"] = b.comm_coef * bal.comm_loss(
                device_hits=hits_G,
                probs=probs_E,
                num_devices=b.num_devices,
                max_devices=min(self.cfg.top_k, b.num_devices),
            )
        if b.importance_coef > 0:
            out["importance"] = b.importance_coef * bal.importance_loss(
                routing.weights, routing.experts, E, mask=mask_T
            )
        if b.load_coef > 0:
            out["load"] = b.load_coef * self._smooth_load(routing, mask_T)
        if b.z_coef > 0:
            out["z"] = b.z_coef * bal.z_loss(routing.logits, mask=mask_T)
        if b.entropy_coef > 0:
            out["entropy"] = b.entropy_coef * bal.token_entropy_loss(dist_TE, mask=mask_T)
        if b.batch_entropy_coef > 0:
            out["batch_entropy"] = b.batch_entropy_coef * bal.batch_entropy_loss(
                dist_TE, mask=mask_T
            )
        if b.overflow_coef > 0 and cap > 0:
            out["overflow"] = b.overflow_coef * bal.overflow_loss(
                counts=counts_E, probs=probs_E, capacity=cap
            )
        return out

    def _scoped_aux(
        self,
        routing: Routing,
        counts_E: Tensor,
        global_E: Tensor,
        probs_E: Tensor,
        mask_T: Tensor | None,
        shape: torch.Size,
    ) -> Tensor:
        scope = self.cfg.balance.aux_scope
        if scope == "sequence":
            return self._sequence_aux(routing, mask_T, shape)
        if scope == "global":
            counts_E = self._global_counts(global_E)
        return bal.switch_loss_from_stats(counts=counts_E, probs=probs_E)

    def _global_counts(self, global_E: Tensor) -> Tensor:
        """Counts over the optimizer step so far (all micro-batches, all data ranks)."""
        return self.step_counts + global_E if self.training else global_E

    def _sequence_aux(self, routing: Routing, mask_T: Tensor | None, shape: torch.Size) -> Tensor:
        """DeepSeek-V3 sequence-wise loss; a 2-D input counts as one sequence."""
        L = shape[-2] if len(shape) >= 3 else shape[0]
        E = self.cfg.num_experts
        dist = bal.score_distribution(routing.scores, self.cfg.router.score)
        mask_BL = None if mask_T is None else mask_T.view(-1, L)
        return bal.sequence_switch_loss(
            dist.view(-1, L, E),
            routing.experts.view(-1, L, routing.experts.shape[1]),
            E,
            mask_BL=mask_BL,
        )

    def _smooth_load(self, routing: Routing, mask_T: Tensor | None) -> Tensor:
        if routing.clean_logits is None or routing.noise_std is None:
            return routing.logits.new_zeros(())  # no noise (eval mode): load is not smooth
        return bal.smooth_load_loss(
            clean_logits=routing.clean_logits,
            noisy_logits=routing.logits,
            noise_std=routing.noise_std,
            k=self.cfg.top_k,
            mask=mask_T,
        )

    @torch.no_grad()
    def _accumulate(self, global_E: Tensor) -> None:
        self.step_counts += global_E

    @torch.no_grad()
    def _stats(self, routing: Routing, mask_T: Tensor | None) -> dict[str, Tensor]:
        return {"z": bal.z_loss(routing.logits, mask=mask_T)}

    # ------------------------------------------------------------------ step boundary

    @torch.no_grad()
    def end_step(self, total_steps: int | None = None) -> None:
        """After an optimizer step: loss-free bias update and adaptive λ from the counts
        accumulated over the step (Wang et al. 2024 Alg. 1: counts of the batch just trained
        on set the bias for the next), then reset the accumulator and advance ``progress``."""
        b = self.cfg.balance
        counts_E = self.step_counts
        if int(counts_E.sum()) > 0:
            if b.bias_rate > 0:
                rate = bal.bias_rate_at(
                    int(self.progress), total_steps or 0, b.bias_rate, b.bias_schedule
                )
                self.bias.copy_(
                    bal.update_bias(self.bias, counts_E, rate, b.bias_rule, center=b.bias_center)
                )
            if b.adaptive_target > 0:
                maxvio = float(max_violation(counts_E))
                self.aux_coef.fill_(
                    bal.adapt_coef(
                        float(self.aux_coef),
                        maxvio,
                        target=b.adaptive_target,
                        rate=b.adaptive_rate,
                        lo=b.adaptive_min,
                        hi=b.adaptive_max,
                    )
                )
        self.step_counts.zero_()
        self.progress += 1


def _check_inputs(
    x: Tensor, d_model: int, *, token_ids: Tensor | None, mask: Tensor | None
) -> None:
    """Raise ``ValueError`` naming the argument and what is allowed for a bad input shape."""
    if x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(
            f"MoELayer input x has shape {tuple(x.shape)}; allowed: (..., d_model={d_model})"
        )
    if not x.is_floating_point():
        raise ValueError(f"MoELayer input x has dtype {x.dtype}; allowed: a floating-point dtype")
    lead = tuple(x.shape[:-1])
    for name, t in (("mask", mask), ("token_ids", token_ids)):
        if t is not None and tuple(t.shape) != lead:
            raise ValueError(
                f"MoELayer {name} has shape {tuple(t.shape)}; allowed: x's leading shape {lead}"
            )


def _slot_mask(routing: Routing, mask_T: Tensor | None) -> Tensor | None:
    """(T, K) valid slots: the routing's own mask and the token padding mask combined."""
    if mask_T is None:
        return routing.mask
    m_TK = mask_T.unsqueeze(1).expand_as(routing.experts)
    return m_TK if routing.mask is None else m_TK & routing.mask


def _counts(experts_TK: Tensor, slot_mask_TK: Tensor | None, num_experts: int) -> Tensor:
    flat = experts_TK.reshape(-1) if slot_mask_TK is None else experts_TK[slot_mask_TK]
    return torch.bincount(flat, minlength=num_experts)


def _masked_mean(x_TE: Tensor, mask_T: Tensor | None) -> Tensor:
    """Mean over valid tokens: (T, E) -> (E,)."""
    if mask_T is None:
        return x_TE.mean(0)
    w_T = mask_T.to(x_TE.dtype)
    return (x_TE * w_T.unsqueeze(1)).sum(0) / w_T.sum().clamp_min(1.0)
