"""MoELayer: route -> balance losses -> dispatch -> experts -> combine.

Legend: T tokens, D model dim, E experts, K slots per token, B sequences, L sequence length.

The layer is usable inside any PyTorch model: ``MoELayer(cfg)(x)`` takes x of shape
(..., D) and returns an :class:`MoEOutput` whose ``output`` has the shape of x and whose
``losses`` hold every balance term already multiplied by its coefficient. Balance losses use
the routing *before* capacity drops (Switch's reading; Megatron-LM #1513).

Two components are chosen when the layer is built: the ``balancer``
(:class:`moelab.balancer.Balancer`, the balance state and policy: selection bias, loss terms,
step counts) and the ``dispatcher`` (``moelab.dispatch.LocalDispatcher`` in one process,
``moelab.ep.AllToAllDispatcher`` under expert parallelism). The only state besides parameters
is the balancer's, saved in checkpoints under the layer's own keys (``bias``, ``step_counts``,
``progress``, ``aux_coef``). Call :meth:`MoELayer.end_step` after every optimizer step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab import balance as bal
from moelab import default_outputs, dispatch, metrics
from moelab.balancer import BalanceInputs, Balancer, in_recompute
from moelab.config import MoEConfig
from moelab.experts import Experts, SharedExperts
from moelab.host import check_label, to_host
from moelab.router import Router
from moelab.routing import NonFiniteRouterError, Routing


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
    """A Mixture-of-Experts FFN layer configured by :class:`moelab.MoEConfig`.

    dispatcher: how planned slots reach the experts (default: one process).
    """

    def __init__(self, cfg: MoEConfig, *, dispatcher: dispatch.Dispatcher | None = None) -> None:
        super().__init__()
        cfg.check_bias_applies()
        self.cfg = cfg
        E = cfg.num_experts
        # First child, so its buffers keep the place the layer's own buffers had.
        r = cfg.router
        self.balancer = Balancer(
            cfg.balance, num_experts=E, top_k=cfg.top_k, score=r.score,
            threshold_ema=r.threshold_ema if r.method == "threshold" else None,
        )  # fmt: skip
        self.router = Router(cfg.router, cfg.d_model, E + cfg.null_experts, cfg.top_k)
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
        self.dispatcher: dispatch.Dispatcher = dispatcher or dispatch.LocalDispatcher()
        if cfg.default_outputs:  # Default MoE: ê (E, D) and whether each expert has one yet
            self.register_buffer("default_ED", torch.zeros(E, cfg.d_model))
            self.register_buffer("default_seen_E", torch.zeros(E, dtype=torch.bool))
        # Set by the model: this layer's index among its MoE layers (named in errors).
        self.layer_index: int | None = None
        self.register_state_dict_post_hook(_flatten_balancer_keys)
        self.register_load_state_dict_pre_hook(_nest_balancer_keys)

    # Read-only views of the balance state (owned by ``self.balancer``).
    bias = property(lambda self: self.balancer.bias, doc="(E,) loss-free selection bias")
    step_counts = property(lambda self: self.balancer.step_counts, doc="(E,) this step's counts")
    progress = property(lambda self: self.balancer.progress, doc="optimizer steps taken")
    aux_coef = property(lambda self: self.balancer.aux_coef, doc="live Switch coefficient")

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
        routing, null_w_T = _real_experts(routing, self.cfg.num_experts)
        slot_mask_TK = _slot_mask(routing, mask_T)
        counts_E = dispatch.routed_counts(routing.experts, slot_mask_TK, self.cfg.num_experts)
        prices_E = self.balancer.price_estimate(routing.scores, mask_T) if self.training else None
        load = self.dispatcher.load(counts_E, prices_E)  # the computation batch (all data ranks)
        tokens = x_TD.shape[0] if mask_T is None else to_host(mask_T.sum(), "real tokens")
        cap = self._capacity(tokens)
        seq_len = x.shape[-2] if x.dim() >= 3 else x_TD.shape[0]  # a 2-D x is one sequence
        losses = self.balancer.losses(
            BalanceInputs(
                routing,
                counts_E,
                load.batch_E,
                self.training,
                mask_T,
                seq_len,
                cap,
                self.router.weight,
            )
        )
        plan = self._plan(routing, slot_mask_TK, cap, counts_E)
        done = self.dispatcher.combine(x_TD, plan, self.experts, load)
        y_TD = done.output_TD
        if self.cfg.default_outputs and self.training and torch.is_grad_enabled():
            y_TD = y_TD + self._default_term(x_TD, routing, slot_mask_TK).to(y_TD.dtype)
        if null_w_T is not None:  # identity experts: gate weight × the input
            w_T = null_w_T if mask_T is None else null_w_T * mask_T
            y_TD = y_TD + w_T.unsqueeze(1).to(y_TD.dtype) * x_TD
        if self.shared is not None:
            y_TD = y_TD + self._shared(x_TD, mask_T)
        if self.training:
            ranks = 1 if load.routed_WE is None else load.routed_WE.shape[0]
            self.balancer.count(load.batch_E, load.prices_E, tokens * ranks)
        stats = self._stats(routing, slot_mask_TK, mask_T)
        if self.training:  # counts of the whole computation batch (all ranks under EP)
            counts_E, kept_E, dropped = done.routed_E, done.kept_E, done.dropped
            stats |= done.stats
        else:
            kept_E, dropped = plan.kept_E, plan.dropped
        return MoEOutput(
            output=y_TD.reshape(x.shape),
            losses=losses,
            counts=counts_E,
            kept=kept_E,
            dropped=dropped,
            experts=routing.experts.detach(),
            slot_mask=slot_mask_TK,
            stats=stats,
        )

    def _shared(self, x_TD: Tensor, mask_T: Tensor | None) -> Tensor:
        """Always-on shared experts (T, D); padding gets no FFN output at all."""
        shared_TD = self.shared(x_TD)
        if mask_T is not None:
            shared_TD = shared_TD * mask_T.unsqueeze(1).to(shared_TD.dtype)
        return shared_TD

    def _route(self, x_TD: Tensor, token_ids_T: Tensor | None) -> Routing:
        """The router's decision; NonFiniteRouterError naming this layer on NaN/inf logits.
        Inside the trainer's step the logits check is deferred (:mod:`moelab.host`), recorded
        under this layer's index, and the step raises the same error after reading it."""
        try:
            with check_label(self.layer_index):
                return self.router(
                    x_TD,
                    bias=self._selection_bias(),
                    step=self.balancer.steps_done(),
                    token_ids=token_ids_T,
                )
        except NonFiniteRouterError as exc:
            raise NonFiniteRouterError(self.layer_index) from exc

    def _selection_bias(self) -> Tensor | None:
        """The router's selection bias: the balancer's (E,), and with null experts their
        shared bias (0 unless ``balance.null_target`` steers it) appended; None when off."""
        bias_E, Z = self.balancer.selection_bias(), self.cfg.null_experts
        null = self.balancer.null_bias if self.balancer.null_control else None
        if not Z or (bias_E is None and null is None):
            return bias_E
        real_E = (
            bias_E if bias_E is not None else self.balancer.bias.new_zeros(self.cfg.num_experts)
        )
        null_Z = null.expand(Z) if null is not None else real_E.new_zeros(Z)
        return torch.cat([real_E, null_Z])

    def _default_term(self, x_TD: Tensor, routing: Routing, slot_mask_TK: Tensor | None) -> Tensor:
        """Default MoE: update each expert's moving-average output ê from this forward (not in
        an activation-checkpointing recompute), then the dense router-gradient term."""
        if not isinstance(self.dispatcher, dispatch.LocalDispatcher):
            raise ValueError(
                "moe.default_outputs needs every expert in this process; allowed: "
                "default_outputs=false under expert parallelism"
            )
        if not in_recompute():
            mean_ED, seen_E = default_outputs.sample_expert_means(
                self.experts, x_TD, routing.experts, slot_mask_TK
            )
            ema, old_ED, mean_ED = (
                self.cfg.default_ema,
                self.default_ED,
                mean_ED.to(self.default_ED),
            )
            blend_ED = ema * old_ED + (1 - ema) * mean_ED
            new_ED = torch.where(self.default_seen_E.unsqueeze(1), blend_ED, mean_ED)
            self.default_ED.copy_(torch.where(seen_E.unsqueeze(1), new_ED, old_ED))
            self.default_seen_E |= seen_E
        return default_outputs.dense_term(
            routing.scores, routing.experts, slot_mask_TK, self.default_ED
        )

    def _capacity(self, num_tokens: int) -> int:
        factor = self.cfg.capacity.factor_for(self.training)
        return dispatch.capacity(num_tokens, self.cfg.top_k, self.cfg.num_experts, factor)

    def _plan(
        self, routing: Routing, slot_mask_TK: Tensor | None, cap: int, routed_E: Tensor
    ) -> dispatch.Plan:
        c, E = self.cfg.capacity, self.cfg.num_experts
        if c.reroute and cap > 0 and routing.mask is None:
            return dispatch.plan_with_reroute(
                routing.experts,
                routing.weights,
                routing.scores,
                E,
                capacity=cap,
                policy=c.policy,
                mask_TK=slot_mask_TK,
                normalize=self.cfg.router.normalize,
                routed_E=routed_E,
            )
        return dispatch.plan(
            routing.experts,
            routing.weights,
            E,
            capacity=cap,
            policy=c.policy,
            mask_TK=slot_mask_TK,
            routed_E=routed_E,
        )

    @torch.no_grad()
    def _stats(
        self, routing: Routing, slot_mask_TK: Tensor | None, mask_T: Tensor | None
    ) -> dict[str, Tensor]:
        """z of the logits; where a token's number of experts varies (a routing mask: expert
        choice, top-p, ReMoE) the mean experts a token and the share of tokens with none."""
        stats = {"z": bal.z_loss(routing.logits, mask=mask_T)}
        if routing.mask is not None:
            n_T = metrics.experts_per_token(slot_mask_TK, mask_T).float()
            real = max(n_T.numel(), 1)
            stats["experts_per_token"] = n_T.sum() / real
            stats["no_expert"] = (n_T == 0).float().sum() / real
        return stats

    # ------------------------------------------------------------------ step boundary

    def end_step(self, total_steps: int | None = None) -> None:
        """After an optimizer step: the balancer's update (``Balancer.end_step``)."""
        self.balancer.end_step(total_steps)


def _flatten_balancer_keys(module: MoELayer, state: dict, prefix: str, meta: dict) -> None:
    """Save the balancer's buffers as ``<layer>.bias`` etc., the checkpoint format from before
    the Balancer existed (old checkpoints load; key order unchanged)."""
    inner = prefix + "balancer."
    for key in [k for k in state if k.startswith(prefix)]:  # this layer's keys, in order
        value = state.pop(key)
        state[prefix + key[len(inner) :] if key.startswith(inner) else key] = value


def _nest_balancer_keys(module: MoELayer, state: dict, prefix: str, *_: object) -> None:
    """Inverse of :func:`_flatten_balancer_keys` when loading."""
    for name in module.balancer._buffers:
        if prefix + name in state:
            state[prefix + "balancer." + name] = state.pop(prefix + name)


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


def _real_experts(routing: Routing, E: int) -> tuple[Routing, Tensor | None]:
    """Split off the null experts (ids >= E) of a routing over E + Z experts.

    Returns the real-expert view, scores (T, E), null slots masked out (their id set to 0),
    and the total gate weight (T,) of each token's null slots (None when the router scores
    only E experts). Everything after routing (balance, dispatch, metrics) sees the view.
    """
    if routing.scores.shape[1] == E:
        return routing, None
    null_TK = routing.experts >= E
    real_TK = ~null_TK if routing.mask is None else routing.mask & ~null_TK
    view = dataclasses.replace(
        routing,
        scores=routing.scores[:, :E],
        experts=routing.experts.masked_fill(null_TK, 0),
        mask=real_TK,
    )
    return view, (routing.weights * null_TK).sum(-1)


def _slot_mask(routing: Routing, mask_T: Tensor | None) -> Tensor | None:
    """(T, K) valid slots: the routing's own mask and the token padding mask combined."""
    if mask_T is None:
        return routing.mask
    m_TK = mask_T.unsqueeze(1).expand_as(routing.experts)
    return m_TK if routing.mask is None else m_TK & routing.mask
