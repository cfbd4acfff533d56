"""Pure statistics on expert counts and routings: balance, dead experts, stability, specialisation.

Shape legend: T tokens, K top-k slots, E experts, B sequences, L sequence length, G groups
(devices), N snapshots, D domains. ``experts_TK`` is int64 in preference order (column 0 = best
choice), as in :class:`moelab.routing.Routing`. ``mask`` is ``(T,)`` bool, False = padding token;
where noted a ``(T, K)`` slot mask is accepted too. Counts are ``(E,)`` tensors of slots.

Convention for empty input (no tokens, all-zero counts): balance statistics return 0 ("nothing to
be imbalanced"), fractions return 0.0, entropies return 0. No function has hidden state except
:class:`DeadExpertTracker`, whose state is explicit and saved in checkpoints.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- helpers


def _slot_mask(experts: Tensor, mask: Tensor | None) -> Tensor:
    """Bool mask of ``experts.shape`` from a token mask ``(...)`` or a slot mask ``(..., K)``."""
    if mask is None:
        return torch.ones_like(experts, dtype=torch.bool)
    mask = mask.to(torch.bool)
    if mask.shape == experts.shape:
        return mask
    if mask.shape == experts.shape[:-1]:
        return mask.unsqueeze(-1).expand_as(experts)
    raise ValueError(
        f"mask shape {tuple(mask.shape)} must be the token shape {tuple(experts.shape[:-1])} "
        f"or the slot shape {tuple(experts.shape)}"
    )


def _check_ids(experts: Tensor, num_experts: int) -> None:
    """Raise ``ValueError`` unless every id lies in ``[0, num_experts)``."""
    if experts.numel() and (experts.min() < 0 or experts.max() >= num_experts):
        raise ValueError(
            f"expert ids must lie in [0, {num_experts}); got range "
            f"[{int(experts.min())}, {int(experts.max())}]"
        )


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (the empty-input convention)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny), 0.0)


def _top1(experts: Tensor) -> Tensor:
    """Best choice per token: ``(T, K) -> (T,)``; a ``(T,)`` tensor is already top-1."""
    return experts if experts.dim() == 1 else experts[..., 0]


def _token_mean(values_T: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values_T`` over unmasked tokens; 0 when no token is kept."""
    keep_T = torch.ones_like(values_T, dtype=torch.bool) if mask is None else mask.bool()
    kept = values_T[keep_T].double()
    return kept.mean() if kept.numel() else torch.zeros((), dtype=torch.float64)


# ----------------------------------------------------------------------------- load balance


def expert_counts(experts: Tensor, num_experts: int, *, mask: Tensor | None = None) -> Tensor:
    """Slots per expert: ``(..., K)`` int ids -> ``(E,)`` int64 counts.

    ``mask`` is a token mask ``(...)`` or a slot mask ``(..., K)``; False slots are not counted.
    """
    _check_ids(experts, num_experts)
    keep = _slot_mask(experts, mask)
    return torch.bincount(experts[keep].long(), minlength=num_experts)


def max_violation(counts: Tensor) -> Tensor:
    """MaxVio = (max_i c_i - mean c) / mean c (Wang et al. 2024, eq. 4); 0 at perfect balance.

    counts ``(..., E)`` -> ``(...)`` float32, reduced over the last dim. An all-zero count vector
    (no tokens) gives 0. Ranges from 0 to E - 1 (all slots on one expert).
    """
    counts = counts.float()
    mean = counts.mean(-1)
    return _safe_div(counts.amax(-1) - mean, mean)


def _counts_per_row(experts_BLK: Tensor, num_experts: int, mask_BL: Tensor | None) -> Tensor:
    """Counts per sequence ``(B, L, K) -> (B, E)``; masked tokens are not counted."""
    B = experts_BLK.shape[0]
    weights_BS = _slot_mask(experts_BLK, mask_BL).reshape(B, -1).long()
    ids_BS = experts_BLK.reshape(B, -1).long()
    counts_BE = torch.zeros(B, num_experts, dtype=torch.int64, device=experts_BLK.device)
    return counts_BE.scatter_add_(1, ids_BS, weights_BS)


def maxvio_per_sequence(
    experts_BLK: Tensor, num_experts: int, *, mask_BL: Tensor | None = None
) -> Tensor:
    """MaxVio of each sequence's own counts (sequence-wise balance, DeepSeek-V3 §2.1.2).

    experts_BLK ``(B, L, K)``, mask_BL ``(B, L)`` (or a slot mask ``(B, L, K)``) -> ``(B,)``
    float32.
    """
    _check_ids(experts_BLK, num_experts)
    return max_violation(_counts_per_row(experts_BLK, num_experts, mask_BL))


def maxvio_by_chunks(
    experts_TK: Tensor, num_experts: int, chunk_tokens: int, *, mask: Tensor | None = None
) -> Tensor:
    """MaxVio_computation-batch: MaxVio of each run of ``chunk_tokens`` consecutive tokens.

    Wang et al. 2024 §5.1 / Fig. 5. experts_TK ``(T, K)`` -> ``(T // chunk_tokens,)`` float32;
    the last partial chunk is dropped. ``mask`` ``(T,)`` drops padding tokens inside chunks.
    """
    T = experts_TK.shape[0]
    if not 1 <= chunk_tokens <= T:
        raise ValueError(f"chunk_tokens={chunk_tokens} must lie in [1, T={T}] (T = tokens given)")
    n = T // chunk_tokens
    experts_NCK = experts_TK[: n * chunk_tokens].reshape(n, chunk_tokens, -1)
    mask_NC = None if mask is None else mask[: n * chunk_tokens].reshape(n, chunk_tokens)
    return maxvio_per_sequence(experts_NCK, num_experts, mask_BL=mask_NC)


def cv(x: Tensor) -> Tensor:
    """Coefficient of variation std/mean over the last dim, population std (Shazeer et al. 2017).

    x ``(..., E)`` -> ``(...)`` float32; 0 where the mean is 0.
    """
    x = x.float()
    return _safe_div(x.std(-1, unbiased=False), x.mean(-1))


class LoadShare(NamedTuple):
    """Share of all slots taken by the least (``min``) and most (``max``) loaded expert."""

    min: Tensor
    max: Tensor


def load_share(counts: Tensor) -> LoadShare:
    """Shares c_i / Σc of the least and most loaded experts; counts ``(E,)`` -> two 0-dim.

    Uniform load gives ``(1/E, 1/E)``; all-zero counts give ``(0, 0)``.
    """
    share_E = _safe_div(counts.float(), counts.float().sum())
    return LoadShare(min=share_E.min(), max=share_E.max())


def max_over_mean(counts: Tensor) -> Tensor:
    """max_i c_i / mean c, the "max/mean load" of Shazeer et al. 2017 Table 6 (= 1 + MaxVio).

    counts ``(..., E)`` -> ``(...)``; 1 at balance and for all-zero counts.
    """
    return 1.0 + max_violation(counts)


def dead_experts(counts: Tensor, *, threshold: float = 0.0) -> Tensor:
    """Experts whose share of slots is ≤ ``threshold`` × the uniform share 1/E.

    counts ``(E,)`` -> ``(E,)`` bool. ``threshold=0`` (default) marks experts never chosen;
    ``threshold=0.1`` marks experts getting at most a tenth of a fair share. With all-zero
    counts every expert is dead.
    """
    counts = counts.float()
    share_E = _safe_div(counts, counts.sum())
    return share_E <= threshold / counts.shape[-1]


def group_imbalance(counts: Tensor, num_groups: int) -> Tensor:
    """MaxVio over ``num_groups`` contiguous groups of experts (devices under expert parallelism).

    counts ``(E,)`` with E divisible by G -> 0-dim float32 (DeepSeek-V2 device-level balance).
    """
    E = counts.shape[-1]
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"num_groups={num_groups} must be ≥ 1 and divide num_experts={E}")
    return max_violation(counts.reshape(*counts.shape[:-1], num_groups, E // num_groups).sum(-1))


def drop_rate(dropped: int | Tensor, total_slots: int | Tensor) -> float:
    """Fraction of token-slots dropped by capacity (Switch Transformers §2.2); 0.0 if no slots."""
    dropped, total_slots = int(dropped), int(total_slots)
    if not 0 <= dropped <= total_slots:
        raise ValueError(f"need 0 <= dropped <= total_slots; got {dropped} and {total_slots}")
    return dropped / total_slots if total_slots else 0.0


def top_n_share(counts: Tensor, n: int) -> Tensor:
    """Top-N expert coverage: the share of slots (0-dim float64) that the n busiest experts
    take from counts (E,); n/E under uniform load, 1 when n experts take everything. 0 for
    all-zero counts."""
    E = counts.shape[-1]
    if not 1 <= n <= E:
        raise ValueError(f"n={n} is out of range; allowed: an integer in [1, {E}]")
    c_E = counts.double()
    return _safe_div(c_E.topk(n, dim=-1).values.sum(-1), c_E.sum(-1))


class RouterSimilarity(NamedTuple):
    """Cosine similarity between the router's expert rows: mean and max over pairs i != j."""

    mean: float
    max: float


def router_similarity(router_ED: Tensor) -> RouterSimilarity:
    """Cosine similarities of the router's expert rows (E, D) over the E·(E−1) ordered pairs
    of distinct experts (SimBal, arXiv 2506.14038, tracks them: near 1 = two experts receive
    the same tokens). One expert: (0, 0)."""
    E = router_ED.shape[0]
    if E < 2:
        return RouterSimilarity(0.0, 0.0)
    unit_ED = torch.nn.functional.normalize(router_ED.detach().double(), dim=-1)
    cos_EE = unit_ED @ unit_ED.T
    off = cos_EE[~torch.eye(E, dtype=torch.bool, device=router_ED.device)]
    return RouterSimilarity(float(off.mean()), float(off.max()))


def experts_per_token(slot_mask_TK: Tensor | None, mask_T: Tensor | None = None) -> Tensor:
    """(T',) int64 number of experts each real token uses (its valid slots), T' the tokens
    ``mask_T`` keeps: varies with expert choice, dynamic top-p (Huang et al. 2024) and ReMoE;
    0 = the token gets no expert (only the residual and shared experts)."""
    if slot_mask_TK is None:
        raise ValueError("slot_mask_TK is None; allowed: a (T, K) bool mask of the used slots")
    n_T = slot_mask_TK.to(torch.bool).sum(-1)
    return n_T if mask_T is None else n_T[mask_T.to(torch.bool)]


# ----------------------------------------------------------------------------- dead-expert tracker


class DeadExpertTracker:
    """Explicit state over a stream of batches: tokens since each expert's last slot, window counts.

    Resolution is one batch: an expert hit anywhere in a batch has ``tokens_since_last_hit = 0``
    after that update; an expert not hit gains the batch's token count. Save with
    :meth:`state_dict` in checkpoints.
    """

    def __init__(self, num_experts: int, *, window: int = 100, top_k: int = 1) -> None:
        if num_experts < 1 or window < 1 or top_k < 1:
            raise ValueError(
                f"num_experts, window and top_k must be ≥ 1; got {num_experts}, {window}, {top_k}"
            )
        self.num_experts, self.window, self.top_k = num_experts, window, top_k
        self.tokens_since_last_hit = torch.zeros(num_experts, dtype=torch.int64)
        self.history: deque[Tensor] = deque(maxlen=window)
        self.num_updates = 0

    def update(self, counts: Tensor, *, num_tokens: int | None = None) -> None:
        """Add one batch's counts ``(E,)``; ``num_tokens`` defaults to Σcounts // top_k."""
        counts = counts.detach().to("cpu", torch.int64)
        if counts.shape != (self.num_experts,):
            raise ValueError(f"counts shape {tuple(counts.shape)} != ({self.num_experts},)")
        tokens = int(counts.sum()) // self.top_k if num_tokens is None else int(num_tokens)
        hit_E = counts > 0
        self.tokens_since_last_hit = torch.where(hit_E, 0, self.tokens_since_last_hit + tokens)
        self.history.append(counts)
        self.num_updates += 1

    @property
    def window_counts(self) -> Tensor:
        """Counts ``(E,)`` summed over the last ``window`` updates (fewer before it fills)."""
        if not self.history:
            return torch.zeros(self.num_experts, dtype=torch.int64)
        return torch.stack(list(self.history)).sum(0)

    def dead(self, window_threshold: float = 0.0) -> Tensor:
        """``dead_experts`` of :attr:`window_counts` ``(E,)`` bool (all True before any update)."""
        return dead_experts(self.window_counts, threshold=window_threshold)

    def state_dict(self) -> dict:
        """Plain dict of tensors and ints, safe for ``torch.save``."""
        history_NE = (
            torch.stack(list(self.history))
            if self.history
            else torch.zeros(0, self.num_experts, dtype=torch.int64)
        )
        return {
            "num_experts": self.num_experts,
            "window": self.window,
            "top_k": self.top_k,
            "num_updates": self.num_updates,
            "tokens_since_last_hit": self.tokens_since_last_hit.clone(),
            "history": history_NE,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the number of experts must match."""
        if state["num_experts"] != self.num_experts:
            raise ValueError(
                f"state has num_experts={state['num_experts']}, tracker has {self.num_experts}"
            )
        self.window, self.top_k = int(state["window"]), int(state["top_k"])
        self.num_updates = int(state["num_updates"])
        self.tokens_since_last_hit = state["tokens_since_last_hit"].clone().long()
        self.history = deque((row.clone().long() for row in state["history"]), maxlen=self.window)


# ----------------------------------------------------------------------------- routing distribution


class RoutingEntropy(NamedTuple):
    """Mean per-token entropy and entropy of the batch-mean routing distribution, in nats."""

    token: Tensor
    batch: Tensor


def _normalise(scores: Tensor) -> Tensor:
    """Scores ``(..., E)`` ≥ 0 scaled to sum to 1 per token (sigmoid allowed, softmax unchanged)."""
    scores = scores.detach().double()
    return _safe_div(scores, scores.sum(-1, keepdim=True))


def _entropy(p: Tensor) -> Tensor:
    """Shannon entropy in nats over the last dim, with 0·log 0 = 0."""
    return -torch.special.xlogy(p, p).sum(-1)


def routing_entropy(scores: Tensor, *, mask: Tensor | None = None) -> RoutingEntropy:
    """Token entropy mean_t H(p_t) and batch entropy H(mean_t p_t) of the routing distribution.

    scores ``(T, E)`` (or ``(..., E)``), mask ``(T,)``; each token's scores are normalised to sum
    to 1. Both are log E at uniform routing; token ≈ 0 for confident routers, batch ≈ 0 when
    every token goes to one expert. Returns two 0-dim float64 tensors.
    """
    p_TE = _normalise(scores).reshape(-1, scores.shape[-1])
    keep_T = torch.ones_like(p_TE[:, 0], dtype=torch.bool) if mask is None else mask.reshape(-1)
    p_TE = p_TE[keep_T.bool()]
    if p_TE.shape[0] == 0:
        zero = torch.zeros((), dtype=torch.float64)
        return RoutingEntropy(token=zero, batch=zero)
    return RoutingEntropy(token=_entropy(p_TE).mean(), batch=_entropy(p_TE.mean(0)))


def topk_mass(scores: Tensor, experts: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Mean over tokens of the summed normalised scores of the selected experts.

    The "top-k score sum" of Qiu et al. 2025 (higher = more confident routing).
    scores ``(T, E)``, experts ``(T, K)``, mask ``(T,)`` -> 0-dim float64.
    """
    mass_T = _normalise(scores).gather(-1, experts.long()).sum(-1)
    return _token_mean(mass_T, mask)


# ----------------------------------------------------------------------------- routing stability


def _check_same_shape(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"snapshots differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def routing_fluctuation(
    experts_a: Tensor, experts_b: Tensor, *, mask: Tensor | None = None
) -> float:
    """Fraction of tokens whose top-1 expert differs between two snapshots (StableMoE, Dai 2022).

    experts ``(T, K)`` in preference order (or ``(T,)`` top-1) for the same tokens.
    """
    _check_same_shape(experts_a, experts_b)
    changed_T = _top1(experts_a) != _top1(experts_b)
    return float(_token_mean(changed_T, mask))


def topk_set_change(experts_a: Tensor, experts_b: Tensor, *, mask: Tensor | None = None) -> float:
    """Fraction of tokens whose set of top-k experts differs (order ignored); experts ``(T, K)``."""
    _check_same_shape(experts_a, experts_b)
    sorted_a, sorted_b = experts_a.sort(-1).values, experts_b.sort(-1).values
    return float(_token_mean((sorted_a != sorted_b).any(-1), mask))


def router_saturation(
    experts_t: Tensor, experts_final: Tensor, *, mask: Tensor | None = None
) -> float:
    """OLMoE router saturation: mean_t |S_t ∩ S_final| / k (Muennighoff et al. 2024 §5).

    experts ``(T, K)`` without repeated ids per token; 1.0 for identical top-k sets.
    """
    _check_same_shape(experts_t, experts_final)
    same_TKK = experts_t.unsqueeze(-1) == experts_final.unsqueeze(-2)
    overlap_T = same_TKK.any(-1).sum(-1).double() / experts_t.shape[-1]
    return float(_token_mean(overlap_T, mask))


def last_change_step(snapshots: Sequence[Tensor], steps: Sequence[int]) -> Tensor:
    """Per token, the last step whose top-1 expert differs from the final snapshot's (StableMoE).

    snapshots: N tensors ``(T, K)`` or ``(T,)`` of the same tokens at strictly increasing
    ``steps``. Returns ``(T,)`` int64; tokens that never differ from the final get ``steps[0]``.
    """
    if len(snapshots) != len(steps) or not snapshots:
        raise ValueError(
            f"need as many snapshots as steps (≥ 1); got {len(snapshots)}, {len(steps)}"
        )
    steps_N = torch.as_tensor(list(steps), dtype=torch.int64)
    if (steps_N.diff() <= 0).any():
        raise ValueError(f"steps must be strictly increasing; got {list(steps)}")
    top1_NT = torch.stack([_top1(s).cpu() for s in snapshots])
    differs_NT = top1_NT != top1_NT[-1]
    step_NT = torch.where(differs_NT, steps_N.unsqueeze(1), steps_N[0])
    return step_NT.amax(0)


def fraction_changed_after(last: Tensor, steps: Sequence[int], frac: float) -> float:
    """Fraction of tokens whose last change step is > ``frac`` × ``steps[-1]``.

    ``steps[-1]`` is taken as the end of training (steps counted from 0). StableMoE reports
    40.9% of tokens with ``frac=0.2`` for BASE Layer.
    """
    return float((last > frac * steps[-1]).double().mean()) if last.numel() else 0.0


# ----------------------------------------------------------------------------- specialisation


def coactivation(experts_TK: Tensor, num_experts: int, *, mask: Tensor | None = None) -> Tensor:
    """Tokens that chose both i and j: ``(T, K) -> (E, E)`` int64, symmetric, diagonal = counts.

    mask ``(T,)`` or slot mask ``(T, K)``. Assumes no repeated id within a token.
    """
    _check_ids(experts_TK, num_experts)
    keep_TK = _slot_mask(experts_TK, mask).long()
    hot_TE = experts_TK.new_zeros(experts_TK.shape[0], num_experts, dtype=torch.int64)
    hot_TE = hot_TE.scatter_reduce(1, experts_TK.long(), keep_TK, reduce="amax")
    return hot_TE.T @ hot_TE


def _joint_counts(
    domains_T: Tensor, experts_TK: Tensor, num_domains: int, num_experts: int, mask: Tensor | None
) -> Tensor:
    """Slot counts per (domain, expert): ``(D, E)`` int64."""
    _check_ids(experts_TK, num_experts)
    _check_ids(domains_T, num_domains)
    keep_TK = _slot_mask(experts_TK, mask)
    cell_TK = domains_T.long().unsqueeze(-1) * num_experts + experts_TK.long()
    flat = torch.bincount(cell_TK[keep_TK], minlength=num_domains * num_experts)
    return flat.reshape(num_domains, num_experts)


def domain_expert_freq(
    domains_T: Tensor,
    experts_TK: Tensor,
    num_domains: int,
    num_experts: int,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """Row-normalised slot frequencies ``(D, E)`` float64: P(expert | domain) for heatmaps.

    A domain with no tokens gets a row of zeros.
    """
    joint_DE = _joint_counts(domains_T, experts_TK, num_domains, num_experts, mask).double()
    return _safe_div(joint_DE, joint_DE.sum(-1, keepdim=True))


def mutual_information(
    domains_T: Tensor,
    experts_TK: Tensor,
    num_domains: int,
    num_experts: int,
    *,
    mask: Tensor | None = None,
) -> float:
    """Plug-in MI(domain; expert) in bits over token-slots, from the joint frequency table.

    MI = Σ p(d,e) log2(p(d,e) / p(d) p(e)); 0 for independent routing, log2 D when each domain
    has its own experts. Biased upwards for small samples (plug-in estimator).
    """
    joint_DE = _joint_counts(domains_T, experts_TK, num_domains, num_experts, mask)
    return mutual_information_from_joint(joint_DE)


def mutual_information_from_joint(joint_DE: Tensor) -> float:
    """MI(domain; expert) in bits from a (D, E) table of slot counts (accumulated over batches)."""
    joint_DE = joint_DE.double()
    total = joint_DE.sum()
    if total == 0:
        return 0.0
    p_DE = joint_DE / total
    outer_DE = p_DE.sum(1, keepdim=True) * p_DE.sum(0, keepdim=True)
    ratio_DE = torch.where(p_DE > 0, p_DE / outer_DE.clamp_min(1e-300), 1.0)
    return float(torch.special.xlogy(p_DE, ratio_DE).sum() / math.log(2))


# ----------------------------------------------------------------------------- across layers


def top1_transitions(
    first_TK: Tensor, next_TK: Tensor, num_experts: int, *, mask_T: Tensor | None = None
) -> Tensor:
    """(E, E) int64 table: tokens whose top-1 expert is i in one layer and j in the next.

    first_TK, next_TK (T, K) the two layers' choices (slot 0 = top-1); mask_T (T,) bool, the
    tokens whose top-1 slot is valid in both layers.
    """
    _check_ids(first_TK[:, :1], num_experts)
    _check_ids(next_TK[:, :1], num_experts)
    cell_T = first_TK[:, 0].long() * num_experts + next_TK[:, 0].long()
    if mask_T is not None:
        cell_T = cell_T[mask_T]
    return torch.bincount(cell_T, minlength=num_experts * num_experts).view(
        num_experts, num_experts
    )


def next_layer_predictability(table_EE: Tensor) -> tuple[float, float]:
    """How well a token's top-1 expert in one layer predicts its top-1 in the next, from a
    transition table (:func:`top1_transitions`, rows = this layer, columns = the next).

    Returns (accuracy of the best fixed map i -> argmax_j table[i, j], the same for the best
    constant guess: the next layer's most common expert). The first at the second means the
    layers route independently; 1.0 means the next layer's load is known one layer ahead (what
    expert prefetching and the routing analyses of Megatron-LM look for). NaN without tokens.
    """
    total = float(table_EE.sum())
    if total == 0:
        return math.nan, math.nan
    return float(table_EE.max(1).values.sum()) / total, float(table_EE.sum(0).max()) / total


def routing_agreement(
    a_TK: Tensor,
    b_TK: Tensor,
    num_experts: int,
    *,
    a_mask: Tensor | None = None,
    b_mask: Tensor | None = None,
) -> float:
    """Share of the (token, expert) choices of routing ``a`` that routing ``b`` also makes:
    Σ_t |A_t ∩ B_t| / Σ_t |A_t| (NaN if ``a`` chose nothing).

    a_TK, b_TK (T, K) the same tokens routed twice, e.g. by the training and the inference
    forward (the signal behind routing replay in RL); masks (T, K) bool mark valid slots.
    Assumes no repeated id within a token.
    """
    _check_ids(a_TK, num_experts)
    _check_ids(b_TK, num_experts)
    keep_b = _slot_mask(b_TK, b_mask)
    hot_TE = torch.zeros(b_TK.shape[0], num_experts, dtype=torch.int64, device=b_TK.device)
    hot_TE = hot_TE.scatter_reduce(1, b_TK.long(), keep_b.long(), reduce="amax").bool()
    keep_a = _slot_mask(a_TK, a_mask)
    chosen = int(keep_a.sum())
    if chosen == 0:
        return math.nan
    return float((hot_TE.gather(1, a_TK.long()) & keep_a).sum()) / chosen
