"""Routing: logits -> ``Routing`` (scores, gate weights, chosen experts) for every routing method.

Shape legend: ``T`` tokens (flattened batch), ``D`` model dim, ``E`` experts, ``K`` top-k slots
per token (``K' = E`` for expert choice and soft warm-up), ``G`` expert groups, ``N`` experts per
group. All routing math runs in fp32. Pure functions; the ``Router`` module that applies them
(with training noise, masking and soft warm-up) is in :mod:`moelab.router`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.config import ScoreFn, check_choice
from moelab.host import all_finite

# Score function name (``moelab.config.ScoreFn``) -> logits (T, E) -> scores (T, E).
SCORE_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "softmax": lambda logits_TE: logits_TE.softmax(-1),  # Switch eq. 1
    "sigmoid": lambda logits_TE: logits_TE.sigmoid(),  # DeepSeek-V3 eq. 15
    "sqrtsoftplus": lambda logits_TE: F.softplus(logits_TE).sqrt(),  # DeepSeek-V4
}
SCORES: tuple[str, ...] = get_args(ScoreFn)
assert set(SCORES) == set(SCORE_FNS), "every ScoreFn needs a formula in SCORE_FNS"


@dataclass(frozen=True)
class Routing:
    """The result of routing T tokens over E experts (see docs/DESIGN.md).

    One shape for every method: K slots per token, (T, K), plus ``mask``. Token-choice top-k
    (plain, noisy, Gumbel, Sinkhorn, hash, random) fills K = top_k slots and leaves ``mask``
    None (every slot used). Methods in which a token takes a variable number of experts
    (expert choice, top-p, ReLU) fill K = E slots and mark the used ones in ``mask``; soft
    warm-up uses all E (``mask`` None). ``slots`` is K either way, never the configured top_k.
    """

    logits: Tensor  # (T, E) fp32 logits used for selection (after noise), for z-loss
    scores: Tensor  # (T, E) after the score fn (SCORE_FNS), before any bias; has grad
    weights: Tensor  # (T, K) gate weights used to combine expert outputs; has grad
    experts: Tensor  # (T, K) int64, preference order (choice 0 = best)
    mask: Tensor | None = None  # (T, K) bool, False = slot unused (expert choice, padding)
    clean_logits: Tensor | None = None  # (T, E) before noise (smooth load loss)
    noise_std: Tensor | None = None  # (T, E) learned-noise std (smooth load loss)

    @property
    def num_experts(self) -> int:
        """E."""
        return self.scores.shape[-1]

    @property
    def slots(self) -> int:
        """K, the slots per token: top_k for token choice, E for variable-count methods."""
        return self.experts.shape[-1]


class NonFiniteRouterError(ValueError):
    """Router logits with NaN or inf; ``layer`` names the MoE layer once the layer knows it."""

    def __init__(self, layer: int | None = None) -> None:
        self.layer = layer
        self.what = "router logits contain NaN or inf" + (
            "" if layer is None else f" in MoE layer {layer}"
        )
        super().__init__(
            f"{self.what}; allowed: finite values (check the router input, router.init_std "
            "and the learning rate)"
        )


def anneal(step: int, steps: int) -> float:
    """Linear decay factor 1 -> 0 over ``steps`` (``steps == 0``: constant 1)."""
    return 1.0 if steps <= 0 else max(0.0, 1.0 - step / steps)


# ----------------------------------------------------------------------------- validation


def check_inputs(logits_TE: Tensor, k: int, score: str, bias_E: Tensor | None) -> None:
    """Raise ``ValueError`` naming the bad argument and what is allowed."""
    if logits_TE.dim() != 2:
        raise ValueError(
            f"logits has shape {tuple(logits_TE.shape)}; "
            "allowed: a 2-D (tokens, num_experts) tensor"
        )
    E = logits_TE.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(
            f"top_k={k!r} is out of range; allowed: an integer in [1, num_experts={E}]"
        )
    check_choice("score", score, SCORES)
    if bias_E is not None and tuple(bias_E.shape) != (E,):
        raise ValueError(f"bias has shape {tuple(bias_E.shape)}; allowed: shape (num_experts={E},)")
    if not all_finite(logits_TE, "finite router logits"):  # a read, unless the step defers it
        raise NonFiniteRouterError()


def check_groups(E: int, k: int, num_groups: int, topk_groups: int) -> None:
    """Group-limited routing needs G | E, 1 <= topk_groups <= G and k <= topk_groups·E/G."""
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide num_experts={E}; allowed: a divisor")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(
            f"topk_groups={topk_groups} is out of range; allowed: an integer in [1, {num_groups}]"
        )
    if k > topk_groups * (E // num_groups):
        raise ValueError(
            f"top_k={k} exceeds the {topk_groups * (E // num_groups)} experts in topk_groups="
            f"{topk_groups} groups; allowed: top_k <= topk_groups * num_experts / num_groups"
        )


# ----------------------------------------------------------------------------- token-choice top-k


def score_fn(logits_TE: Tensor, score: str) -> Tensor:
    """Router scores (T, E) of logits (T, E) by the formula of ``SCORE_FNS[score]``."""
    check_choice("score", score, SCORES)
    return SCORE_FNS[score](logits_TE)


def _limit_groups(sel_TE: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    """Mask (-inf) the experts outside each token's best ``topk_groups`` groups (T, E).

    DeepSeek-V3 §2.1 (node-limited) / V2 device-limited routing: a group's score is the sum of
    its two highest scores (the max for one-expert groups).
    """
    T, E = sel_TE.shape
    sel_TGN = sel_TE.view(T, num_groups, E // num_groups)
    group_TG = sel_TGN.topk(min(2, E // num_groups), dim=-1).values.sum(-1)  # (T, G)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_TG.topk(topk_groups, dim=-1).indices, True)
    return sel_TGN.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)


def select_topk(sel_TE: Tensor, k: int, *, num_groups: int = 1, topk_groups: int = 1) -> Tensor:
    """Experts (T, K) int64 with the k highest selection scores, best first (no grad)."""
    if num_groups > 1 and topk_groups < num_groups:
        sel_TE = _limit_groups(sel_TE, num_groups, topk_groups)
    return sel_TE.topk(k, dim=-1).indices


def gate_weights(
    logits_TE: Tensor,
    scores_TE: Tensor,
    experts_TK: Tensor,
    *,
    normalize: bool,
    topk_before_softmax: bool = False,
) -> Tensor:
    """Gate weights (T, K) of the chosen experts from the *unbiased* scores.

    Mixtral (``topk_before_softmax``): softmax over the k selected logits. Otherwise the gathered
    scores, renormalised to sum to 1 if ``normalize`` (DeepSeek-V3 eq. 13, Qwen/OLMoE) or raw
    (Switch eq. 2).
    """
    if topk_before_softmax:
        return logits_TE.gather(1, experts_TK).softmax(-1)
    weights_TK = scores_TE.gather(1, experts_TK)
    return weights_TK / weights_TK.sum(-1, keepdim=True) if normalize else weights_TK


def route(
    logits: Tensor,
    k: int,
    *,
    score: str = "softmax",
    bias: Tensor | None = None,
    normalize: bool = True,
    topk_before_softmax: bool = False,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> Routing:
    """Token-choice top-k routing of logits (T, E) -> Routing with K = k slots.

    ``bias`` (E,) is added to the scores for selection only (loss-free balancing, Wang et al.
    2024 eq. 3); weights gather the unbiased scores. Group-limited routing: DeepSeek-V3 §2.1.
    """
    check_inputs(logits, k, score, bias)
    check_groups(logits.shape[1], k, num_groups, topk_groups)
    logits_TE = logits.float()
    scores_TE = score_fn(logits_TE, score)  # (T, E)
    sel_TE = scores_TE.detach() if bias is None else scores_TE.detach() + bias.float()
    experts_TK = select_topk(sel_TE, k, num_groups=num_groups, topk_groups=topk_groups)
    weights_TK = gate_weights(
        logits_TE,
        scores_TE,
        experts_TK,
        normalize=normalize,
        topk_before_softmax=topk_before_softmax,
    )
    return Routing(logits_TE, scores_TE, weights_TK, experts_TK)


def soften(routing: Routing, alpha: float, *, normalize: bool) -> Routing:
    """Soft routing warm-up: dense mixture of all E experts, K' = E slots per token.

    weights_TE = alpha·p + (1 − alpha)·hard, where p are the scores (divided by their sum if
    ``normalize``) and hard the top-k weights scattered (0 for unselected experts). Slots are
    ordered by that weight (best first), so at alpha = 0 the first k slots are the hard routing.
    """
    scores_TE = routing.scores
    dense_TE = scores_TE / scores_TE.sum(-1, keepdim=True) if normalize else scores_TE
    hard_TE = torch.zeros_like(scores_TE).scatter(1, routing.experts, routing.weights)
    weights_TE = alpha * dense_TE + (1.0 - alpha) * hard_TE  # (T, E)
    experts_TE = weights_TE.detach().argsort(dim=-1, descending=True)
    return dataclasses.replace(
        routing, weights=weights_TE.gather(1, experts_TE), experts=experts_TE
    )


# ----------------------------------------------------------------------------- other methods


def _dense_routing(logits_TE: Tensor, scores_TE: Tensor, chosen_TE: Tensor) -> Routing:
    """Routing with K' = E slots: experts = arange(E), weights = score where chosen, else 0."""
    T, E = scores_TE.shape
    experts_TE = torch.arange(E, device=scores_TE.device).expand(T, E)
    weights_TE = scores_TE * chosen_TE
    return Routing(logits_TE, scores_TE, weights_TE, experts_TE, mask=chosen_TE)


def expert_choice_route(logits: Tensor, k: int, *, score: str = "softmax") -> Routing:
    """Expert choice (Zhou et al. 2022 eq. 1): each expert takes its C = ceil(T·k/E) best tokens.

    NON-CAUSAL in a decoder LM: whether token t is chosen depends on later tokens of the batch
    (future-token leakage). Returns K' = E slots; ``mask`` marks the chosen (token, expert)
    pairs; a token may get 0..E experts. Weights are the unnormalised scores (as in the paper).
    """
    check_inputs(logits, k, score, None)
    logits_TE = logits.float()
    scores_TE = score_fn(logits_TE, score)  # (T, E)
    T, E = scores_TE.shape
    C = min(T, math.ceil(T * k / E))
    chosen_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
    chosen_TE.scatter_(0, scores_TE.detach().topk(C, dim=0).indices, True)  # (C, E) token ids
    return _dense_routing(logits_TE, scores_TE, chosen_TE)


def threshold_route(
    logits: Tensor, k: int, *, threshold: Tensor | None, score: str = "softmax"
) -> Routing:
    """Expert-threshold routing (arXiv 2603.11535): token t joins every expert i whose score
    reaches the expert's threshold, s_ti >= τ_i, so each token gets 0..E experts and each expert
    about its share of tokens, without an aux loss. Causal: τ (E,) comes from past batches
    (``Balancer``); before the first estimate (``threshold`` None) each token takes its top-k.

    logits (T, E) -> Routing with K' = E slots in expert order; ``mask`` marks the chosen
    pairs; weights are the unnormalised scores of the chosen experts (as in expert choice).
    """
    check_inputs(logits, k, score, threshold)
    logits_TE = logits.float()
    scores_TE = score_fn(logits_TE, score)
    sel_TE = scores_TE.detach()
    if threshold is None:
        chosen_TE = torch.zeros_like(sel_TE, dtype=torch.bool)
        chosen_TE.scatter_(1, sel_TE.topk(k, dim=-1).indices, True)
    else:
        chosen_TE = sel_TE >= threshold.float()
    return _dense_routing(logits_TE, scores_TE, chosen_TE)


class _HeunMultiplier(torch.autograd.Function):
    """SparseMixer's gate weight with its third-order (Heun) gradient estimate (Liu et al.
    2023, "Sparse Backpropagation for MoE Training"; as in Phi-3.5-MoE).

    Forward: ``weight_T1 · scale_T1`` (scale 1 or 1/3, the midpoint mask). Backward to the
    logits (T, E): with g = grad · weight, −probs · g everywhere plus g at the chosen expert,
    i.e. the gradient of the chosen expert's softmax probability, scaled by it.
    """

    @staticmethod
    def forward(ctx, logits_TE, weight_T1, chosen_T1, probs_TE, scale_T1):  # noqa: D102
        ctx.save_for_backward(weight_T1, chosen_T1, probs_TE)
        return weight_T1 * scale_T1

    @staticmethod
    def backward(ctx, grad_T1):  # noqa: D102
        weight_T1, chosen_T1, probs_TE = ctx.saved_tensors
        g_T1 = grad_T1 * weight_T1
        grad_TE = (probs_TE * -g_T1).scatter_add(1, chosen_T1, g_T1)
        return grad_TE, None, None, None, None


def _sparse_round(
    logits_TE: Tensor, left_TE: Tensor, eps: float, training: bool
) -> tuple[Tensor, Tensor]:
    """One SparseMixer choice among the logits ``left`` (taken experts at −inf): experts whose
    logit is within a relative 2·eps of the best compete; in training one is drawn by Gumbel-max
    and weighted through :class:`_HeunMultiplier`, at inference the best is taken. Returns the
    weight (T, 1) and the expert (T, 1)."""
    with torch.no_grad():
        best_T1, arg_T1 = left_TE.max(dim=-1, keepdim=True)
        far_TE = (best_T1 - logits_TE) / logits_TE.abs().clamp(min=best_T1) > 2 * eps
    masked_TE = left_TE.masked_fill(far_TE, float("-inf"))
    if training:
        gumbel_TE = torch.empty_like(masked_TE).exponential_().log()
        chosen_T1 = (masked_TE - gumbel_TE).max(dim=-1)[1].unsqueeze(-1)
    else:
        chosen_T1 = arg_T1
    probs_TE = masked_TE.softmax(-1)
    weight_T1 = probs_TE.gather(1, chosen_T1)
    if not training:
        return weight_T1, chosen_T1
    top_T1 = probs_TE.max(dim=-1, keepdim=True)[1]
    midpoint_T1 = (chosen_T1 == top_T1) | (torch.rand_like(weight_T1) > 0.75)
    scale_T1 = torch.add(0.3333, midpoint_T1, alpha=0.6667).to(probs_TE.dtype)
    return _HeunMultiplier.apply(logits_TE, weight_T1, chosen_T1, probs_TE, scale_T1), chosen_T1


def sparsemixer_route(logits: Tensor, k: int, *, eps: float, training: bool) -> Routing:
    """SparseMixer routing (Liu et al. 2023; Phi-3.5-MoE): k rounds, each choosing one expert
    among those whose logit is within a relative 2·eps of the best left (:func:`_sparse_round`),
    the chosen ones set to −inf for the next round. In training the choice is sampled and the
    router gets a dense third-order gradient estimate instead of the top-k paths only (seed
    000/004). logits (T, E) -> Routing with K = k slots; weights are per-round probabilities."""
    check_inputs(logits, k, "softmax", None)
    logits_TE = logits.float()
    left_TE, weights, experts = logits_TE, [], []
    for _ in range(k):
        w_T1, e_T1 = _sparse_round(logits_TE, left_TE, eps, training)
        weights.append(w_T1)
        experts.append(e_T1)
        left_TE = left_TE.scatter(1, e_T1, float("-inf"))
    return Routing(logits_TE, logits_TE.softmax(-1), torch.cat(weights, 1), torch.cat(experts, 1))


def top_p_route(logits: Tensor, p: float, *, normalize: bool = True) -> Routing:
    """Dynamic top-p routing: each token takes its experts in order of softmax probability
    until their cumulative probability reaches p (at least one; 1..E experts a token).

    Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models".

    logits (T, E) -> Routing with K' = E slots in preference order; ``mask`` (T, E) marks the
    slots taken; weights are the probabilities of the taken experts (0 elsewhere), divided by
    their sum if ``normalize`` (the paper's form: ``normalize=False``).
    """
    check_inputs(logits, 1, "softmax", None)
    if not 0 < p <= 1:
        raise ValueError(f"p={p!r} is out of range; allowed: a number in (0, 1]")
    logits_TE = logits.float()
    probs_TE = logits_TE.softmax(-1)
    sorted_TE, experts_TE = probs_TE.detach().sort(-1, descending=True)
    taken_TE = sorted_TE.cumsum(-1) - sorted_TE < p  # the mass of the better ones is short of p
    weights_TE = probs_TE.gather(1, experts_TE) * taken_TE
    if normalize:
        weights_TE = weights_TE / weights_TE.sum(-1, keepdim=True)
    return Routing(logits_TE, probs_TE, weights_TE, experts_TE, mask=taken_TE)


def relu_route(logits: Tensor, *, score: str = "softmax") -> Routing:
    """ReMoE routing: gates R = ReLU(logits) over all E experts; a token uses expert i iff
    R_ti > 0 (0..E experts a token; fully differentiable).

    Wang, Zhu & Chen, ICLR 2025, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU
    Routing".

    logits (T, E) -> Routing with K' = E slots (experts = arange(E)); weights (T, E) = R;
    ``mask`` = R > 0. ``scores`` are ``score`` of the logits, the distribution the balance
    terms and metrics read; the sparsity comes from ReMoE's adaptive L1 term
    (``balance.relu_l1_loss``).
    """
    check_inputs(logits, 1, score, None)
    logits_TE = logits.float()
    T, E = logits_TE.shape
    gates_TE = logits_TE.relu()
    experts_TE = torch.arange(E, device=logits_TE.device).expand(T, E)
    return Routing(logits_TE, score_fn(logits_TE, score), gates_TE, experts_TE, mask=gates_TE > 0)


@torch.no_grad()
def sinkhorn(logits_TE: Tensor, iters: int) -> Tensor:
    """Log of the balanced assignment (T, E): Sinkhorn on exp(logits) (Lewis et al. 2021 §3.1).

    Alternately normalises columns (each expert receives T/E of the mass) and rows (each token
    has mass 1), in log space for stability.
    """
    T, E = logits_TE.shape
    log_P = logits_TE.float()
    for _ in range(iters):  # a few iterations over (T, E), not a loop over tokens
        log_P = log_P - log_P.logsumexp(0, keepdim=True) + math.log(T / E)
        log_P = log_P - log_P.logsumexp(1, keepdim=True)
    return log_P


def sinkhorn_route(
    logits: Tensor,
    k: int,
    *,
    iters: int,
    score: str = "softmax",
    normalize: bool = True,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> Routing:
    """BASE-style balanced routing: top-k of the Sinkhorn-balanced matrix picks the experts.

    Weights come from the unbalanced scores so the router still learns (BASE layers use the
    router score of the assigned expert). ``bias`` does not apply: selection is balanced already.
    """
    check_inputs(logits, k, score, None)
    check_groups(logits.shape[1], k, num_groups, topk_groups)
    logits_TE = logits.float()
    scores_TE = score_fn(logits_TE, score)
    balanced_TE = sinkhorn(logits_TE.detach(), iters)
    experts_TK = select_topk(balanced_TE, k, num_groups=num_groups, topk_groups=topk_groups)
    weights_TK = gate_weights(logits_TE, scores_TE, experts_TK, normalize=normalize)
    return Routing(logits_TE, scores_TE, weights_TK, experts_TK)


def _hash_keys(token_ids_T: Tensor, E: int) -> Tensor:
    """Fixed pseudo-random keys (T, E) from (token id, expert): two LCG rounds mod 2^31."""
    x = (token_ids_T.long().unsqueeze(1) * E + torch.arange(E, device=token_ids_T.device)) % 2**31
    for _ in range(2):  # values stay < 2^31, so x·1103515245 fits in int64
        x = (x * 1103515245 + 12345) % 2**31
        x = x ^ (x >> 16)
    return x


def fixed_routing(logits: Tensor, experts_TK: Tensor, *, score: str = "softmax") -> Routing:
    """Routing with given experts (T, K) and weights 1/K; logits/scores kept for the aux metrics."""
    logits_TE = logits.float()
    weights_TK = torch.full(experts_TK.shape, 1.0 / experts_TK.shape[1], device=logits.device)
    return Routing(logits_TE, score_fn(logits_TE, score), weights_TK, experts_TK)


def hash_experts(token_ids: Tensor, k: int, num_experts: int) -> Tensor:
    """k distinct experts (T, K) per token from a fixed hash of its id (Roller et al. 2021)."""
    return _hash_keys(token_ids.reshape(-1), num_experts).topk(k, dim=-1).indices


def random_experts(num_tokens: int, k: int, num_experts: int, device=None) -> Tensor:
    """k distinct uniformly random experts (T, K) per token."""
    return torch.rand(num_tokens, num_experts, device=device).topk(k, dim=-1).indices


def uniform_experts(num_tokens: int, k: int, num_experts: int, device=None) -> Tensor:
    """Round-robin experts (T, K): token t gets (t·k + j) mod E; every expert gets T·k/E tokens."""
    slots_TK = torch.arange(num_tokens * k, device=device).view(num_tokens, k)
    return slots_TK % num_experts
