"""Load-balancing losses and the loss-free bias rules, as pure functions.

Shape legend: T tokens, E experts, K top-k, B sequences, L sequence length, G devices
(expert groups). ``scores_TE`` is a (T, E) tensor. A padding ``mask`` is (T,) bool with
False = padding; masked tokens are left out of every count, mean and sum.

Conventions (see docs/balance.md): every loss returns a 0-dim fp32 tensor with coefficient 1;
the Switch / device / communication losses equal 1.0 under perfect balance. Counts are
constants (no gradient); gradients flow into scores, probabilities, gate weights and logits.
Losses written over ``counts`` and ``probs`` are *scope-free*: ``counts`` may be accumulated
over the micro-batches of an optimizer step or all-reduced over ranks (Qiu et al. 2025).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from moelab.config import ScoreFn

BiasRule = Literal["sign", "proportional", "multiplicative"]
BiasSchedule = Literal["constant", "linear", "cosine"]

# ----------------------------------------------------------------------------- helpers


def _check(name: str, ok: bool, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")


def _tiny(x: Tensor) -> float:
    return torch.finfo(x.dtype).tiny


def _token_weights(mask_BL: Tensor | None, shape: tuple[int, ...], device) -> Tensor:
    """(B, L) float32 token weights: 1 for real tokens, 0 for padding."""
    if mask_BL is None:
        return torch.ones(shape, dtype=torch.float32, device=device)
    _check("mask", mask_BL.dtype == torch.bool, "a bool tensor", mask_BL.dtype)
    _check("mask", tuple(mask_BL.shape) == shape, f"shape {shape}", tuple(mask_BL.shape))
    return mask_BL.float()


def _check_experts(scores_BLE: Tensor, experts_BLK: Tensor, num_experts: int) -> None:
    _check("num_experts", num_experts == scores_BLE.shape[-1], "scores.shape[-1]", num_experts)
    _check("experts", not experts_BLK.is_floating_point(), "an integer tensor", experts_BLK.dtype)
    _check(
        "experts",
        experts_BLK.shape[:-1] == scores_BLE.shape[:-1],
        f"leading shape {tuple(scores_BLE.shape[:-1])}",
        tuple(experts_BLK.shape),
    )


def _slot_counts(experts_BLK: Tensor, num_experts: int, w_BL: Tensor) -> Tensor:
    """(B, E) float32 number of token-slots choosing each expert (padding excluded)."""
    B, L, K = experts_BLK.shape
    w_BS = w_BL[..., None].expand(B, L, K).reshape(B, L * K)
    counts_BE = torch.zeros(B, num_experts, dtype=torch.float32, device=w_BL.device)
    return counts_BE.scatter_add_(1, experts_BLK.reshape(B, L * K).long(), w_BS)


def _masked_mean(x_BLE: Tensor, w_BL: Tensor) -> Tensor:
    """(B, E) mean over the L axis of real tokens only."""
    total_B1 = w_BL.sum(1, keepdim=True).clamp_min(1.0)
    return (x_BLE.float() * w_BL[..., None]).sum(1) / total_B1


def _cv_squared(x_E: Tensor) -> Tensor:
    """Squared coefficient of variation var/mean² with the *population* variance."""
    mean = x_E.mean()
    return x_E.var(unbiased=False) / (mean * mean).clamp_min(_tiny(x_E))


def _group_sum(x_E: Tensor, num_devices: int) -> Tensor:
    """(G,) sums of x over ``num_devices`` contiguous, equal expert groups."""
    E = x_E.shape[-1]
    _check(
        "num_devices", num_devices >= 1 and E % num_devices == 0, f"a divisor of {E}", num_devices
    )
    return x_E.reshape(num_devices, E // num_devices).sum(-1)


# ----------------------------------------------------------------------------- score handling


def _per_token_distribution(scores_TE: Tensor) -> Tensor:
    # No additive epsilon: s / (Σs + eps) lets a router shrink every sigmoid score toward 0
    # to shrink the loss (Megatron-LM #1545). The clamp only guards an exact zero sum.
    return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(_tiny(scores_TE))


def score_distribution(scores: Tensor, score: ScoreFn) -> Tensor:
    """Per-token routing distribution (T, E) from scores (T, E) (DeepSeek-V3 eq. 19: s').

    softmax scores are returned unchanged; other scores (sigmoid) are divided by their
    per-token sum without an epsilon, so the result is invariant to scaling all scores (no
    gaming).
    """
    allowed = get_args(ScoreFn)
    _check("score", score in allowed, " or ".join(map(repr, allowed)), score)
    return scores if score == "softmax" else _per_token_distribution(scores)


# ----------------------------------------------------------------------------- Switch family


def switch_loss_from_stats(*, counts: Tensor, probs: Tensor) -> Tensor:
    """E·Σ_i (c_i/Σ_j c_j)·P_i from counts (E,) and mean scores probs (E,) -> 0-dim fp32.

    Switch Transformers eq. 4-6 with f_i = E/(K·T)·c_i = E·c_i/Σc (DeepSeek-V2 eq. 12-14).
    Scope-free: counts may be accumulated over micro-batches or ranks (Qiu et al. 2025).
    """
    _check("probs", probs.shape == counts.shape, f"shape {tuple(counts.shape)}", probs.shape)
    c_E = counts.detach().float()
    share_E = c_E / c_E.sum().clamp_min(_tiny(c_E))
    return counts.shape[-1] * (share_E * probs.float()).sum()


def switch_loss(
    scores: Tensor, experts: Tensor, num_experts: int, *, mask: Tensor | None = None
) -> Tensor:
    """Switch load-balancing loss E/(K·T)·Σ_i c_i·P_i -> 0-dim fp32; 1.0 at perfect balance.

    scores (T, E): per-token distributions (softmax, or ``score_distribution`` of sigmoid
    scores); experts (T, K) chosen *before* capacity drops; mask (T,). Switch eq. 4,
    DeepSeek-V2 eq. 12-14. transformers' ``load_balancing_loss_func`` returns K times this.
    """
    _check_experts(scores, experts, num_experts)
    w_1T = _token_weights(mask, tuple(scores.shape[:1]), scores.device)[None]
    counts_E = _slot_counts(experts[None], num_experts, w_1T)[0]
    probs_E = _masked_mean(scores[None], w_1T)[0]
    return switch_loss_from_stats(counts=counts_E, probs=probs_E)


def sequence_switch_loss(
    scores_BLE: Tensor, experts_BLK: Tensor, num_experts: int, *, mask_BL: Tensor | None = None
) -> Tensor:
    """Mean over sequences of the per-sequence Switch loss -> 0-dim fp32.

    DeepSeek-V3 eq. 17-20 (complementary sequence-wise balance loss, T = tokens of one
    sequence). Sequences that are all padding are left out of the mean.
    """
    _check_experts(scores_BLE, experts_BLK, num_experts)
    w_BL = _token_weights(mask_BL, tuple(scores_BLE.shape[:2]), scores_BLE.device)
    counts_BE = _slot_counts(experts_BLK, num_experts, w_BL)
    probs_BE = _masked_mean(scores_BLE, w_BL)
    share_BE = counts_BE / counts_BE.sum(1, keepdim=True).clamp_min(1.0)
    loss_B = num_experts * (share_BE * probs_BE).sum(1)
    real_B = (w_BL.sum(1) > 0).float()
    return (loss_B * real_B).sum() / real_B.sum().clamp_min(1.0)


def device_loss(*, counts: Tensor, probs: Tensor, num_devices: int) -> Tensor:
    """Device-level balance loss Σ_d f'_d·P'_d -> 0-dim fp32; 1.0 at perfect balance.

    DeepSeek-V2 eq. 15-17: f_j = E·c_j/Σc, f'_d = mean of f_j over the experts of device d,
    P'_d = Σ of P_j over them; experts split into ``num_devices`` contiguous groups.
    counts (E,), probs (E,) as in ``switch_loss_from_stats``.
    """
    _check("probs", probs.shape == counts.shape, f"shape {tuple(counts.shape)}", probs.shape)
    E = counts.shape[-1]
    c_E = counts.detach().float()
    f_E = E * c_E / c_E.sum().clamp_min(_tiny(c_E))
    f_G = _group_sum(f_E, num_devices) / (E // num_devices)
    return (f_G * _group_sum(probs.float(), num_devices)).sum()


def device_hits(
    experts: Tensor, num_experts: int, num_devices: int, *, mask: Tensor | None = None
) -> Tensor:
    """(G,) float32: number of tokens with at least one selected expert on each device.

    experts (T, K); expert j lives on device j // (E/G) (contiguous groups). DeepSeek-V2 eq. 18.
    """
    _check(
        "num_devices",
        num_devices >= 1 and num_experts % num_devices == 0,
        f"a divisor of num_experts={num_experts}",
        num_devices,
    )
    w_T = _token_weights(mask, tuple(experts.shape[:1]), experts.device)
    device_TK = experts.long() // (num_experts // num_devices)
    hit_TG = torch.zeros(experts.shape[0], num_devices, device=experts.device)
    hit_TG.scatter_(1, device_TK, 1.0)
    return (hit_TG * w_T[:, None]).sum(0)


def comm_loss(*, device_hits: Tensor, probs: Tensor, num_devices: int, max_devices: int) -> Tensor:
    """Communication balance loss Σ_d f''_d·P''_d -> 0-dim fp32; 1.0 at perfect balance.

    DeepSeek-V2 eq. 18-20: f''_d = G/(M·T)·hits_d, P''_d = Σ_{j∈d} P_j. We take
    M·T = Σ_d hits_d (exact when every token visits exactly M = ``max_devices`` devices, as
    device-limited routing does), so f''_d = G·hits_d/Σ hits and the loss is scope-free.
    device_hits (G,) from ``device_hits``; probs (E,) mean scores.
    """
    _check(
        "device_hits",
        device_hits.shape == (num_devices,),
        f"shape ({num_devices},)",
        tuple(device_hits.shape),
    )
    _check(
        "max_devices",
        1 <= max_devices <= num_devices,
        f"an integer in [1, {num_devices}]",
        max_devices,
    )
    h_G = device_hits.detach().float()
    f_G = num_devices * h_G / h_G.sum().clamp_min(_tiny(h_G))
    return (f_G * _group_sum(probs.float(), num_devices)).sum()


def overflow_loss(*, counts: Tensor, probs: Tensor, capacity: int) -> Tensor:
    """E·Σ_i (max(0, c_i − C)/Σc)·P_i -> 0-dim fp32; 0 when no expert overflows.

    Pushes router probability away from experts over capacity C. counts (E,) and capacity
    must share a scope (usually one micro-batch); capacity 0 means dropless (loss 0).
    """
    _check("capacity", capacity >= 0, "an integer >= 0 (0 = dropless)", capacity)
    c_E = counts.detach().float()
    excess_E = (c_E - capacity).clamp_min(0) if capacity > 0 else torch.zeros_like(c_E)
    share_E = excess_E / c_E.sum().clamp_min(_tiny(c_E))
    return counts.shape[-1] * (share_E * probs.float()).sum()


# ----------------------------------------------------------------------------- CV², z, entropy


def importance_loss(
    weights: Tensor, experts: Tensor, num_experts: int, *, mask: Tensor | None = None
) -> Tensor:
    """CV(Importance)² with Importance_i = Σ_t G_t,i -> 0-dim fp32 (Shazeer 2017 eq. 6).

    weights (T, K) gate values, experts (T, K); G (T, E) scatters them. Population variance.
    """
    _check(
        "experts",
        experts.shape == weights.shape,
        f"shape {tuple(weights.shape)}",
        tuple(experts.shape),
    )
    w_T = _token_weights(mask, tuple(weights.shape[:1]), weights.device)
    gates_TE = torch.zeros(weights.shape[0], num_experts, device=weights.device)
    gates_TE = gates_TE.scatter_add(1, experts.long(), weights.float())
    return _cv_squared((gates_TE * w_T[:, None]).sum(0))


def smooth_load_loss(
    *,
    clean_logits: Tensor,
    noisy_logits: Tensor,
    noise_std: Tensor,
    k: int,
    mask: Tensor | None = None,
) -> Tensor:
    """CV(Load)² with the smooth load estimator -> 0-dim fp32 (Shazeer 2017 eq. 8-10).

    P(t, i) = Φ((clean_ti − kth_excluding(noisy_t, k, i)) / std_ti), Load_i = Σ_t P(t, i).
    kth_excluding is the (k+1)-th largest noisy logit if i is in the top-k, else the k-th.
    clean_logits, noisy_logits (T, E); noise_std (T, E) or broadcastable, > 0; 1 <= k < E.
    """
    E = noisy_logits.shape[-1]
    _check("k", isinstance(k, int) and 1 <= k < E, f"an integer in [1, {E - 1}]", k)
    _check(
        "clean_logits",
        clean_logits.shape == noisy_logits.shape,
        f"shape {tuple(noisy_logits.shape)}",
        tuple(clean_logits.shape),
    )
    w_T = _token_weights(mask, tuple(noisy_logits.shape[:1]), noisy_logits.device)
    top_TK1 = noisy_logits.float().topk(k + 1, dim=-1).values
    kth_T1, next_T1 = top_TK1[:, k - 1 : k], top_TK1[:, k : k + 1]
    in_topk_TE = noisy_logits > next_T1
    threshold_TE = torch.where(in_topk_TE, next_T1, kth_T1)
    prob_TE = torch.special.ndtr((clean_logits.float() - threshold_TE) / noise_std.float())
    return _cv_squared((prob_TE * w_T[:, None]).sum(0))


def z_loss(logits: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Router z-loss mean_t (logsumexp_j x_tj)² -> 0-dim fp32 (ST-MoE eq. 5). logits (T, E)."""
    w_T = _token_weights(mask, tuple(logits.shape[:1]), logits.device)
    lse_T = torch.logsumexp(logits.float(), dim=-1)
    return (lse_T.square() * w_T).sum() / w_T.sum().clamp_min(1.0)


def _entropy(p_NE: Tensor) -> Tensor:
    # clamp keeps 0·log 0 = 0 with a finite gradient
    return -(p_NE * p_NE.clamp_min(_tiny(p_NE)).log()).sum(-1)


def token_entropy_loss(scores: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """log E − mean_t H(p_t) >= 0 -> 0-dim fp32; 0 when every token routes uniformly.

    scores (T, E), softmax or sigmoid: normalised per token without an epsilon
    (``score_distribution``; a no-op for softmax). Minimising raises per-token entropy.
    """
    w_T = _token_weights(mask, tuple(scores.shape[:1]), scores.device)
    h_T = _entropy(_per_token_distribution(scores.float()))
    return math.log(scores.shape[-1]) - (h_T * w_T).sum() / w_T.sum().clamp_min(1.0)


def batch_entropy_loss(scores: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """log E − H(mean_t p_t) >= 0 -> 0-dim fp32; 0 when the batch-mean routing is uniform.

    scores (T, E) as in ``token_entropy_loss``. Minimising spreads the batch over experts
    while leaving each token free to be confident.
    """
    w_1T = _token_weights(mask, tuple(scores.shape[:1]), scores.device)[None]
    mean_E = _masked_mean(_per_token_distribution(scores.float())[None], w_1T)[0]
    return math.log(scores.shape[-1]) - _entropy(mean_E)


def relu_l1_loss(
    gates_TE: Tensor, *, counts: Tensor, top_k: int, mask: Tensor | None = None
) -> Tensor:
    """ReMoE's load-balanced L1 of ReLU gates (1/T)·Σ_t Σ_i f_i·R_ti -> 0-dim fp32, with
    f_i = E·c_i/(k·T) and c_i the tokens whose gate i is positive (Wang, Zhu & Chen, ICLR
    2025: the L1 sparsity term, weighted by each expert's load so busy experts are pushed
    off first; f_i = 1 for every expert at balance with k experts a token).

    gates_TE (T, E) the ReLU gates R (has grad); counts (E,) c (no grad); top_k the target
    number k of experts a token; mask (T,) padding. Scope-free in c like the Switch loss.
    """
    T, E = gates_TE.shape
    _check("counts", tuple(counts.shape) == (E,), f"shape ({E},)", tuple(counts.shape))
    _check("top_k", isinstance(top_k, int) and 1 <= top_k <= E, f"an integer in [1, {E}]", top_k)
    w_T = _token_weights(mask, (T,), gates_TE.device)
    n = w_T.sum().clamp_min(1.0)
    f_E = E * counts.detach().float() / (top_k * n)
    return ((gates_TE.float() * w_T[:, None]).sum(0) * f_E).sum() / n


def simbal_loss(router_ED: Tensor) -> Tensor:
    """‖R·Rᵀ − I‖₁ over the router's expert rows R (E, D) -> 0-dim fp32, the entry-wise L1
    distance of their Gram matrix (E, E) from the identity: 0 when the rows are orthonormal
    (SimBal, "similarity-preserving routers", arXiv 2506.14038: orthogonal router rows map
    similar tokens to similar expert mixtures, and balance without a load term)."""
    _check("router", router_ED.dim() == 2, "a 2-D (num_experts, d_model) tensor", router_ED.dim())
    R_ED = router_ED.float()
    gram_EE = R_ED @ R_ED.T
    return (gram_EE - torch.eye(R_ED.shape[0], device=R_ED.device)).abs().sum()


def adapt_l1_coef(coef: float, experts_per_token: float, *, top_k: int, rate: float) -> float:
    """ReMoE's adaptive λ: coef·(1+rate)^sign(experts_per_token − k), i.e. up while tokens use
    more than k experts (sparsity below 1 − k/E), down while fewer (Wang, Zhu & Chen 2025,
    α = 1 + rate)."""
    _check("rate", rate >= 0, "a number >= 0", rate)
    step = (experts_per_token > top_k) - (experts_per_token < top_k)
    return float(coef * (1.0 + rate) ** step)


# ----------------------------------------------------------------------------- loss-free bias


@torch.no_grad()
def update_bias(
    bias: Tensor, counts: Tensor, rate: float, rule: BiasRule = "sign", *, center: bool = False
) -> Tensor:
    """New selection bias (E,) after one loss-free balancing step (Wang et al. 2024 Alg. 1).

    error e_i = mean(c) − c_i (> 0 for underloaded experts). Rules:
    ``sign``: b + u·sign(e) (Alg. 1); ``proportional``: b + u·e/mean(c) (Table 3's u·e,
    made scale-free); ``multiplicative``: b + u·log((mean(c)+1)/(c_i+1)), which multiplies an
    expert's selection odds exp(logit + b) by ((mean+1)/(c_i+1))^u. ``center`` subtracts the
    mean afterwards. bias (E,), counts (E,); no autograd.
    """
    _check(
        "rule",
        rule in ("sign", "proportional", "multiplicative"),
        "'sign', 'proportional' or 'multiplicative'",
        rule,
    )
    _check("bias", bias.dim() == 1, "a 1-D tensor of shape (E,)", tuple(bias.shape))
    _check("counts", counts.shape == bias.shape, f"shape {tuple(bias.shape)}", tuple(counts.shape))
    _check("rate", rate >= 0, "a number >= 0", rate)
    c_E = counts.double()
    mean = c_E.mean()
    if rule == "sign":
        step_E = torch.sign(mean - c_E)
    elif rule == "proportional":
        step_E = (mean - c_E) / mean.clamp_min(_tiny(c_E))
    else:
        step_E = torch.log((mean + 1) / (c_E + 1))
    new_E = bias.double() + rate * step_E
    if center:
        new_E = new_E - new_E.mean()
    return new_E.to(bias.dtype)


@torch.no_grad()
def quantile_prices(
    scores_TE: Tensor, prices_E: Tensor, k: int, *, mask: Tensor | None = None
) -> Tensor:
    """Next expert prices β (E,) of Quantile Balancing (Su 2026, "MoE World Tour 6: Optimal
    Allocation for Equilibrium"; Megatron-LM ``quantile_balancing``).

    With scores s (T, E) and the current prices β (E,), tokens choose the top-k of s − β.
    Each token's cutoff a_t is its (k+1)-th largest value of s_t − β; the next β_i is the
    (C+1)-th largest over tokens of s_ti − a_t with C = ⌈T·k/E⌉ (the T-th when C + 1 > T), so
    that about C tokens still prefer expert i at that price. Padding (``mask`` False) is left
    out. The selection bias is −β. Requires 1 <= k < E; no autograd.
    """
    E = scores_TE.shape[-1]
    _check("k", isinstance(k, int) and 1 <= k < E, f"an integer in [1, {E - 1}]", k)
    _check("prices", tuple(prices_E.shape) == (E,), f"shape ({E},)", tuple(prices_E.shape))
    s_TE = scores_TE.detach().float()
    if mask is not None:
        s_TE = s_TE[mask]
    T = s_TE.shape[0]
    _check("scores", T >= 1, "at least one (unmasked) token", T)
    cutoff_T1 = (s_TE - prices_E.float()).topk(k + 1, dim=-1).values[:, k : k + 1]
    rank = min(math.ceil(T * k / E) + 1, T)
    return (s_TE - cutoff_T1).topk(rank, dim=0).values[rank - 1]


@torch.no_grad()
def expert_thresholds(scores_TE: Tensor, k: int, *, mask: Tensor | None = None) -> Tensor:
    """This batch's score threshold (E,) of each expert for expert-threshold routing
    (arXiv 2603.11535): the C-th largest score of expert i over the batch's tokens, C =
    ⌈T·k/E⌉, the score at which expert i would take its fair share of T·k/E tokens (as expert
    choice does). Averaged over steps (``router.threshold_ema``) it estimates the threshold of
    the global token distribution. Padding (``mask`` False) is left out; no autograd."""
    E = scores_TE.shape[-1]
    _check("k", isinstance(k, int) and 1 <= k <= E, f"an integer in [1, {E}]", k)
    s_TE = scores_TE.detach().float()
    if mask is not None:
        s_TE = s_TE[mask]
    T = s_TE.shape[0]
    _check("scores", T >= 1, "at least one (unmasked) token", T)
    rank = min(math.ceil(T * k / E), T)
    return s_TE.topk(rank, dim=0).values[rank - 1]


def bias_rate_at(step: int, total_steps: int, rate: float, schedule: BiasSchedule) -> float:
    """Bias update rate u at ``step``: constant, or linear / cosine decay to 0 at total_steps.

    DeepSeek-V3 §4.2 uses u = 0.001, then 0 for the last ~3% of tokens (a step schedule).
    """
    _check(
        "schedule",
        schedule in ("constant", "linear", "cosine"),
        "'constant', 'linear' or 'cosine'",
        schedule,
    )
    if schedule == "constant":
        return float(rate)
    _check("total_steps", total_steps >= 1, "an integer >= 1", total_steps)
    frac = min(max(step / total_steps, 0.0), 1.0)
    if schedule == "linear":
        return float(rate * (1.0 - frac))
    return float(rate * 0.5 * (1.0 + math.cos(math.pi * frac)))


def adapt_coef(
    coef: float, maxvio: float, *, target: float, rate: float, lo: float, hi: float
) -> float:
    """Adaptive-λ controller: coef·(1+rate) if maxvio > target, else coef/(1+rate), in [lo, hi]."""
    _check("rate", rate >= 0, "a number >= 0", rate)
    _check("hi", lo <= hi, f"a number >= lo={lo}", hi)
    new = coef * (1.0 + rate) if float(maxvio) > target else coef / (1.0 + rate)
    return float(min(max(new, lo), hi))
