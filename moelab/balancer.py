"""Balancer: the one owner of an MoE layer's balancing state and policy.

Legend: T tokens, E experts, K slots per token, B sequences, L sequence length, G devices.

A :class:`Balancer` holds the balance state of one MoE layer (buffers, saved in checkpoints):
``bias`` (E,) the loss-free selection bias, ``step_counts`` (E,) slots counted over the
micro-batches (and data ranks) of the current optimizer step, ``progress`` the optimizer steps
taken, ``aux_coef`` the live Switch coefficient (adaptive λ). It applies the policy:

- :meth:`Balancer.losses` computes every balance term whose coefficient is on, from one
  :class:`BalanceInputs` (before capacity drops), driven by the table :data:`TERMS`: a term's
  name (its key in ``losses``), its config field, the pure function of ``moelab.balance`` it
  calls and what it needs. Adding a term is one pure function, one config field, one row.
- :meth:`Balancer.count` adds the computation batch's counts to the step (training forwards);
  :meth:`Balancer.end_step` updates the bias (Wang et al. 2024 Alg. 1) and adaptive λ from them
  and advances ``progress``; :meth:`Balancer.reset_step` drops them (a skipped step).
- :meth:`Balancer.stats` gives the logger what it reports.

Both ``moelab.moe.MoELayer`` and the Hugging Face attach (``moelab.hf.attach``) use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab import balance as bal
from moelab.config import BalanceConfig, ScoreFn
from moelab.host import to_host
from moelab.metrics import max_violation
from moelab.routing import Routing

# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class BalanceInputs:
    """One forward's routing as the balance terms see it (before capacity drops).

    routing: scores (T, E), gate weights (T, K), experts (T, K), logits (T, E).
    counts_E: (E,) int64 slots per expert of this micro-batch on this rank.
    batch_E: (E,) the same over the computation batch (summed over data ranks; = counts_E in
        one process). training: a training-mode forward (global scope adds ``step_counts``).
    mask_T: (T,) bool, False = padding, or None. seq_len: L when the T tokens are whole
        sequences of length L, else None (sequence terms are left out).
    capacity: expert capacity C in force (0 = dropless). router_ED: (E, D) the router's
    weight (expert rows), for terms on the router itself, or None.
    """

    routing: Routing
    counts_E: Tensor
    batch_E: Tensor
    training: bool
    mask_T: Tensor | None = None
    seq_len: int | None = None
    capacity: int = 0
    router_ED: Tensor | None = None


@dataclass(frozen=True)
class Shared:
    """What several terms read, computed once per forward: dist_TE (T, E) the per-token
    routing distribution (DeepSeek-V3 eq. 19: s'), probs_E (E,) its mean over real tokens
    (P_i of Switch eq. 4)."""

    dist_TE: Tensor
    probs_E: Tensor


def _masked_mean(x_TE: Tensor, mask_T: Tensor | None) -> Tensor:
    """Mean over valid tokens: (T, E) -> (E,)."""
    if mask_T is None:
        return x_TE.mean(0)
    w_T = mask_T.to(x_TE.dtype)
    return (x_TE * w_T.unsqueeze(1)).sum(0) / w_T.sum().clamp_min(1.0)


def in_recompute() -> bool:
    """Whether this forward runs inside an autograd backward pass, as the recompute of
    activation checkpointing does (reentrant or not): a forward that was counted already.
    Outside a backward the engine's current graph task id is -1."""
    return torch._C._current_graph_task_id() != -1


# ----------------------------------------------------------------------------- the term table

TermFn = Callable[["Balancer", BalanceInputs, Shared], Tensor | None]


@dataclass(frozen=True)
class Term:
    """One balance term: ``losses[name] = cfg.<coef> · fn(...)`` (None from fn: not here).

    needs: what the term reads besides scores and counts (``placement``: expert groups of
    ``balance.num_devices``; ``gates``: gate weights; ``noise``: learned router noise;
    ``capacity``; ``sequence``: the sequence shape; ``router``: the router weight).
    live: the buffer of the Balancer that holds the term's live coefficient (``aux_coef``:
    adaptive λ, the aux term is on when ``aux_coef`` or ``adaptive_target`` is; ``l1_coef``:
    ReMoE's λ), "" = the config value.
    """

    name: str
    coef: str
    fn: TermFn
    needs: tuple[str, ...] = ()
    live: str = ""


def _aux(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor:
    """Switch loss at ``aux_scope``: micro counts, or the step's counts so far (global).

    A recompute (activation checkpointing) finds this forward's counts in ``step_counts``
    already, so it reads them alone: the same counts as the forward it repeats.
    """
    counts_E = x.counts_E
    if b.cfg.aux_scope == "global":  # all micro-batches of the step, all data ranks
        if not x.training:
            counts_E = x.batch_E
        else:
            counts_E = b.step_counts if in_recompute() else b.step_counts + x.batch_E
    return bal.switch_loss_from_stats(counts=counts_E, probs=s.probs_E)


def _seq_aux(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor | None:
    """DeepSeek-V3 sequence-wise Switch loss over (B, L) whole sequences.

    It takes its own distribution node rather than ``s.dist_TE`` (the same values): sharing it
    would change the order in which autograd sums the score gradients, so the numerics of
    sigmoid runs would move in the last bits.
    """
    T, L = x.routing.scores.shape[0], x.seq_len
    if L is None or L < 1 or T % L:
        return None
    E, experts_TK = b.num_experts, x.routing.experts
    dist_TE = bal.score_distribution(x.routing.scores, b.score)
    return bal.sequence_switch_loss(
        dist_TE.view(-1, L, E),
        experts_TK.view(-1, L, experts_TK.shape[1]),
        E,
        mask_BL=None if x.mask_T is None else x.mask_T.view(-1, L),
    )


def _device(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor:
    return bal.device_loss(counts=x.counts_E, probs=s.probs_E, num_devices=b.cfg.num_devices)


def _comm(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor:
    G = b.cfg.num_devices
    hits_G = bal.device_hits(x.routing.experts, b.num_experts, G, mask=x.mask_T)
    return bal.comm_loss(
        device_hits=hits_G, probs=s.probs_E, num_devices=G, max_devices=min(b.top_k, G)
    )


def _importance(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor:
    r = x.routing
    return bal.importance_loss(r.weights, r.experts, b.num_experts, mask=x.mask_T)


def _load(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor:
    r = x.routing
    if r.clean_logits is None or r.noise_std is None:
        return r.logits.new_zeros(())  # no noise (eval mode): load is not smooth
    return bal.smooth_load_loss(
        clean_logits=r.clean_logits,
        noisy_logits=r.logits,
        noise_std=r.noise_std,
        k=b.top_k,
        mask=x.mask_T,
    )


def _z(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor:
    return bal.z_loss(x.routing.logits, mask=x.mask_T)


def _entropy(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor:
    return bal.token_entropy_loss(s.dist_TE, mask=x.mask_T)


def _batch_entropy(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor:
    return bal.batch_entropy_loss(s.dist_TE, mask=x.mask_T)


def _overflow(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor | None:
    if x.capacity <= 0:
        return None  # dropless: nothing overflows
    return bal.overflow_loss(counts=x.counts_E, probs=s.probs_E, capacity=x.capacity)


def _l1(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor:
    r = x.routing  # relu routing: K' = E slots in expert order, weights = the ReLU gates
    return bal.relu_l1_loss(r.weights, counts=x.counts_E, top_k=b.top_k, mask=x.mask_T)


def _simbal(b: Balancer, x: BalanceInputs, s: Shared) -> Tensor | None:
    return None if x.router_ED is None else bal.simbal_loss(x.router_ED)


# Order is the order of ``losses`` (and of their sum).
TERMS: tuple[Term, ...] = (
    Term("aux", "aux_coef", _aux, live="aux_coef"),  # Switch eq. 4 / Qiu et al. 2025
    Term("seq_aux", "seq_aux_coef", _seq_aux, ("sequence",)),  # DeepSeek-V3 eq. 17-20
    Term("device", "device_coef", _device, ("placement",)),  # DeepSeek-V2 eq. 15-17
    Term("comm", "comm_coef", _comm, ("placement",)),  # DeepSeek-V2 eq. 18-20
    Term("importance", "importance_coef", _importance, ("gates",)),  # Shazeer 2017 eq. 6
    Term("load", "load_coef", _load, ("noise",)),  # Shazeer 2017 eq. 8-10
    Term("z", "z_coef", _z),  # ST-MoE eq. 5
    Term("entropy", "entropy_coef", _entropy),
    Term("batch_entropy", "batch_entropy_coef", _batch_entropy),
    Term("overflow", "overflow_coef", _overflow, ("capacity",)),
    Term("l1", "l1_coef", _l1, ("gates",), live="l1_coef"),  # ReMoE (Wang et al. 2025)
    Term("simbal", "simbal_coef", _simbal, ("router",)),  # SimBal, arXiv 2506.14038
)


def active_terms(cfg: BalanceConfig) -> list[Term]:
    """The rows of :data:`TERMS` switched on by ``cfg``."""
    on = [t for t in TERMS if getattr(cfg, t.coef) > 0]
    return on if cfg.adaptive_target <= 0 or TERMS[0] in on else [TERMS[0], *on]


# ----------------------------------------------------------------------------- the owner


class Balancer(nn.Module):
    """Balancing state and policy of one MoE layer (see the module docstring).

    num_experts E, top_k K: the layer's sizes; score: its score function (for the per-token
    distribution of sigmoid scores).
    """

    def __init__(
        self,
        cfg: BalanceConfig,
        *,
        num_experts: int,
        top_k: int,
        score: ScoreFn = "softmax",
        threshold_ema: float | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.num_experts, self.top_k, self.score = cfg, num_experts, top_k, score
        self.threshold_ema = threshold_ema  # not None: expert-threshold routing's τ = −bias
        self.terms = active_terms(cfg)
        self.register_buffer("bias", torch.zeros(num_experts))
        self.register_buffer("step_counts", torch.zeros(num_experts, dtype=torch.int64))
        self.register_buffer("progress", torch.zeros((), dtype=torch.int64))
        self.register_buffer("aux_coef", torch.tensor(cfg.aux_coef, dtype=torch.float32))
        if self.quantile or self.thresholds:  # only then: the others keep their state keys
            self.register_buffer("price_sum", torch.zeros(num_experts))
            self.register_buffer("price_count", torch.zeros((), dtype=torch.int64))
        if self.relu_l1:  # ReMoE's live λ
            self.register_buffer("l1_coef", torch.tensor(cfg.l1_coef, dtype=torch.float32))
        if self.relu_l1 or self.null_control:  # the step's tokens: real experts a token
            self.register_buffer("step_tokens", torch.zeros((), dtype=torch.int64))
        if self.null_control:  # LongCat-Flash: the null experts' shared selection bias
            self.register_buffer("null_bias", torch.zeros(()))
        self._steps: int | None = None  # ``progress`` on the host; None: read it once

    def steps_done(self) -> int:
        """``progress`` as a Python int: read from the buffer once (after building or loading),
        then advanced by :meth:`end_step` without reading the device again."""
        if self._steps is None:
            self._steps = int(to_host(self.progress, "balancer progress"))
        return self._steps

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._steps = None  # a loaded ``progress``: read again

    # ------------------------------------------------------------------ forward

    @property
    def bias_on(self) -> bool:
        """Whether the loss-free bias moves (and so takes part in selection)."""
        return self.cfg.bias_on

    @property
    def quantile(self) -> bool:
        """Quantile Balancing (``bias_rule="quantile"``): the bias is −β, the expert prices."""
        return self.cfg.bias_rule == "quantile"

    @property
    def thresholds(self) -> bool:
        """Expert-threshold routing (``router.method="threshold"``): the bias is −τ, each
        expert's moving-average score threshold."""
        return self.threshold_ema is not None

    @property
    def null_control(self) -> bool:
        """The null experts' bias is steered toward ``null_target`` real experts a token."""
        return self.cfg.null_target > 0

    @property
    def relu_l1(self) -> bool:
        """ReMoE's adaptive L1 term is on (``l1_coef > 0``)."""
        return self.cfg.l1_coef > 0

    def selection_bias(self) -> Tensor | None:
        """(E,) bias to add to the scores for selection only, or None when it is off (under
        expert-threshold routing −τ, None before the first optimizer step)."""
        if self.thresholds:
            return self.bias if self.steps_done() > 0 else None
        return self.bias if self.bias_on else None

    def losses(self, x: BalanceInputs) -> dict[str, Tensor]:
        """Every term switched on, weighted by its coefficient: name -> 0-dim loss."""
        if not self.terms:
            return {}
        dist_TE = bal.score_distribution(x.routing.scores, self.score)
        shared = Shared(dist_TE, _masked_mean(dist_TE, x.mask_T))
        out: dict[str, Tensor] = {}
        for term in self.terms:
            value = term.fn(self, x, shared)
            if value is not None:
                out[term.name] = self._coef(term) * value
        return out

    def _coef(self, term: Term) -> Tensor | float:
        return getattr(self, term.live) if term.live else getattr(self.cfg, term.coef)

    @torch.no_grad()
    def price_estimate(self, scores_TE: Tensor, mask_T: Tensor | None = None) -> Tensor | None:
        """Quantile Balancing: this forward's estimate (E,) of the next prices β from its scores
        (T, E) at the current β = −bias (``balance.quantile_prices``); None for other rules or
        a forward with no real token."""
        if not (self.quantile or self.thresholds):
            return None
        if mask_T is not None and not bool(mask_T.any()):
            return None
        if self.thresholds:
            return bal.expert_thresholds(scores_TE, self.top_k, mask=mask_T)
        return bal.quantile_prices(scores_TE, -self.bias, self.top_k, mask=mask_T)

    @torch.no_grad()
    def count(self, batch_E: Tensor, prices_E: Tensor | None = None, tokens: int = 0) -> None:
        """Add a training forward's computation-batch counts (E,) to the step, under Quantile
        Balancing its price estimate (E,) (already averaged over data ranks), and with ReMoE's
        L1 its number of real tokens. The recompute of activation checkpointing adds nothing:
        its forward was counted."""
        if in_recompute():
            return
        self.step_counts += batch_E
        if prices_E is not None:
            self.price_sum += prices_E
            self.price_count += 1
        if self.relu_l1 or self.null_control:
            self.step_tokens += tokens

    # ------------------------------------------------------------------ step boundary

    def rate_at(self, total_steps: int | None) -> float:
        """Bias update rate u of the step now ending (``bias_schedule``); 0 with the bias off."""
        b = self.cfg
        if b.bias_rate <= 0:
            return 0.0
        return bal.bias_rate_at(self.steps_done(), total_steps or 0, b.bias_rate, b.bias_schedule)

    @torch.no_grad()
    def end_step(self, total_steps: int | None = None) -> None:
        """After an optimizer step: loss-free bias update and adaptive λ from the counts
        accumulated over the step (Wang et al. 2024 Alg. 1: counts of the batch just trained
        on set the bias for the next), then reset the counts and advance ``progress``. A step
        with no training forward (counts all zero) changes nothing but ``progress``."""
        b, counts_E = self.cfg, self.step_counts
        counted_1 = counts_E.sum() > 0  # 0-dim bool on the device: no host read for it
        if self.thresholds:
            self._threshold_update(counted_1)
        elif self.quantile:
            self._quantile_update(counted_1)
        elif b.bias_rate > 0:
            new_E = bal.update_bias(
                self.bias, counts_E, self.rate_at(total_steps), b.bias_rule, center=b.bias_center
            )
            self.bias.copy_(torch.where(counted_1, new_E, self.bias))
        if b.adaptive_target > 0 and to_host(counted_1, "any expert counts"):
            self.aux_coef.fill_(self._adapted(float(to_host(max_violation(counts_E), "MaxVio"))))
        if self.relu_l1 or self.null_control:
            self._per_token_updates(counts_E)
        self.reset_step()
        self.progress += 1
        self._steps = None if self._steps is None else self._steps + 1

    def _per_token_updates(self, counts_E: Tensor) -> None:
        """The controllers of the real experts a token, from the step's slots per real token
        (also when no token got an expert; nothing without a real token): ReMoE's live λ and
        LongCat-Flash's null-expert bias."""
        tokens = to_host(self.step_tokens, "step tokens")
        if tokens <= 0:
            return
        per_token = to_host(counts_E.sum(), "step slots") / tokens
        b = self.cfg
        if self.relu_l1:
            new = bal.adapt_l1_coef(
                float(self.l1_coef), per_token, top_k=self.top_k, rate=b.l1_rate
            )
            self.l1_coef.fill_(new)
        if self.null_control:
            self.null_bias += b.null_rate * (per_token - b.null_target)

    def _quantile_update(self, counted_1: Tensor) -> None:
        """β ← the step's mean price estimate, mixed with the old β by ``quantile_ema`` (only
        after a step that counted slots and estimated prices; no host read)."""
        n_1 = self.price_count
        est_E, ema = self.price_sum / n_1.clamp_min(1), self.cfg.quantile_ema
        prices_E = est_E if ema == 0 else ema * -self.bias + (1.0 - ema) * est_E
        bias_E = -prices_E
        bias_E = bias_E - bias_E.mean() if self.cfg.bias_center else bias_E
        self.bias.copy_(torch.where(counted_1 & (n_1 > 0), bias_E, self.bias))

    def _threshold_update(self, counted_1: Tensor) -> None:
        """τ ← the step's mean threshold estimate, mixed with the old τ by ``threshold_ema``
        (the first step's estimate as it is; no host read)."""
        n_1 = self.price_count
        est_E, ema = self.price_sum / n_1.clamp_min(1), float(self.threshold_ema)
        tau_E = est_E if self.steps_done() == 0 else ema * -self.bias + (1 - ema) * est_E
        self.bias.copy_(torch.where(counted_1 & (n_1 > 0), -tau_E, self.bias))

    def _adapted(self, maxvio: float) -> float:
        b = self.cfg
        return bal.adapt_coef(
            float(self.aux_coef),
            maxvio,
            target=b.adaptive_target,
            rate=b.adaptive_rate,
            lo=b.adaptive_min,
            hi=b.adaptive_max,
        )

    @torch.no_grad()
    def reset_step(self) -> None:
        """Forget the counts of the current step (a skipped step updates nothing)."""
        self.step_counts.zero_()
        if self.quantile or self.thresholds:
            self.price_sum.zero_()
            self.price_count.zero_()
        if self.relu_l1 or self.null_control:
            self.step_tokens.zero_()

    def stats(self) -> dict[str, float]:
        """What the logger reports: mean |bias|, bias range, the live aux coefficient (and
        ReMoE's live λ, the null experts' bias when they are on)."""
        bias_E = self.bias
        out = {
            "bias_absmean": float(bias_E.abs().mean()),
            "bias_range": float(bias_E.max() - bias_E.min()),
            "aux_coef": float(self.aux_coef),
        }
        if self.relu_l1:
            out["l1_coef"] = float(self.l1_coef)
        if self.null_control:
            out["null_bias"] = float(self.null_bias)
        return out
