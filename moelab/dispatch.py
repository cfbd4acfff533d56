"""Capacity, token dropping and permute / unpermute for one process.

Legend: T tokens, D model dim, E experts, K slots per token, S kept token-slots, C capacity.

A routing assigns every token K *slots* (token, expert, weight). Dispatch sorts the kept slots
by expert so that each expert's tokens form one contiguous segment of a (S, D) buffer; experts
run on their segments (``moelab.experts``) and the results are scattered back, weighted by the
gate. Memory is O(T·K·D); there is no (T, E, C) one-hot dispatch tensor (unlike GShard/Switch
reference code).

A *dispatcher* moves the planned slots to the experts and back; the MoE layer is built with one
(``LocalDispatcher`` here, ``moelab.ep.AllToAllDispatcher`` across an EP group). It has two
calls: ``load(routed_E, prices_E=None)`` gives the computation batch's counts (before the
balance losses, which need them; with Quantile Balancing also the mean price estimate),
``combine(x_TD, plan, experts, load)`` the weighted expert output and the computation batch's
kept counts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from moelab.host import to_host

DropPolicy = Literal["score", "position"]


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """Expert capacity C = ceil(T·K/E·CF) (Switch Transformers §2.2); 0 means dropless."""
    if factor < 0:
        raise ValueError(
            f"capacity factor={factor!r} is out of range; allowed: >= 0 (0 = dropless)"
        )
    if factor == 0:
        return 0
    return max(1, math.ceil(num_tokens * top_k / num_experts * factor))


@dataclass(frozen=True)
class Plan:
    """Where every kept token-slot goes.

    token_S: token index of each kept slot, sorted by expert (stable: token order inside).
    weight_S: gate weight of each kept slot (carries the router gradient).
    slot_S: index of each kept slot in the flattened (T·K) routing.
    kept_E: kept slots per expert (the segment lengths); ``splits`` reads them to the host
        on first use (the per-expert loop needs them, grouped GEMM takes ``kept_E`` itself).
    routed_E: valid slots per expert *before* drops (the load the router asked for).
    kept_TK: which slots were kept (False: dropped or masked out).
    capacity: C in force (0 = dropless).
    """

    token_S: Tensor
    weight_S: Tensor
    slot_S: Tensor
    kept_E: Tensor
    routed_E: Tensor
    kept_TK: Tensor
    capacity: int
    _splits: list[int] | None = None  # kept_E on the host, once read

    @property
    def splits(self) -> list[int]:
        """Kept slots per expert as Python ints (one host read, then kept)."""
        if self._splits is None:
            object.__setattr__(self, "_splits", to_host(self.kept_E, "expert segment sizes"))
        return self._splits

    @property
    def sizes(self) -> list[int] | Tensor:
        """The segment sizes as they are at hand: ``splits`` once read, else ``kept_E`` (so a
        consumer that needs no host values reads none)."""
        return self._splits if self._splits is not None else self.kept_E

    @property
    def dropped(self) -> Tensor:
        """Number of dropped slots (0-dim int64)."""
        return self.routed_E.sum() - self.kept_E.sum()


def routed_counts(experts_TK: Tensor, mask_TK: Tensor | None, num_experts: int) -> Tensor:
    """(E,) int64 valid slots per expert before drops; experts_TK (T, K), mask_TK (T, K) bool."""
    valid_S = None if mask_TK is None else mask_TK.reshape(-1)
    return _bincount(experts_TK.reshape(-1), valid_S, num_experts)


def plan(
    experts_TK: Tensor,
    weights_TK: Tensor,
    num_experts: int,
    *,
    capacity: int | Tensor = 0,
    policy: DropPolicy = "score",
    mask_TK: Tensor | None = None,
    routed_E: Tensor | None = None,
) -> Plan:
    """Sort token-slots by expert and drop those over capacity.

    experts_TK (T, K) int64, weights_TK (T, K), mask_TK (T, K) bool (False = unused slot, e.g.
    padding or expert-choice slots not chosen). ``policy="score"`` keeps each expert's highest
    gate weights (Megatron "probs"); ``"position"`` keeps first choices before second choices,
    then earlier tokens first (GShard Alg. 1 / Switch). ``capacity`` is an int (0 = dropless)
    or an (E,) tensor of per-expert room (used when re-routing). ``routed_E``: the
    ``routed_counts`` of these slots when the caller has them already.
    """
    T, K = experts_TK.shape
    if policy not in ("score", "position"):
        raise ValueError(f"policy={policy!r} is not allowed; choose one of ['score', 'position']")
    experts_S = experts_TK.reshape(-1)
    valid_S = None if mask_TK is None else mask_TK.reshape(-1)
    if routed_E is None:
        routed_E = _bincount(experts_S, valid_S, num_experts)
    if isinstance(capacity, Tensor) or (capacity > 0 and _over(routed_E, capacity)):
        keep_S = _within_capacity(experts_S, weights_TK, valid_S, num_experts, capacity, policy)
    else:
        keep_S = valid_S
    slot_S = _sort_by_expert(experts_S, keep_S)
    kept_E = routed_E if keep_S is valid_S else _bincount(experts_S, keep_S, num_experts)
    kept_TK = (
        torch.ones(T, K, dtype=torch.bool, device=experts_TK.device)
        if keep_S is None
        else keep_S.view(T, K)
    )
    return Plan(
        token_S=torch.div(slot_S, K, rounding_mode="floor"),
        weight_S=weights_TK.reshape(-1).index_select(0, slot_S),
        slot_S=slot_S,
        kept_E=kept_E,
        routed_E=routed_E,
        kept_TK=kept_TK,
        capacity=capacity if isinstance(capacity, int) else -1,
    )


def _over(routed_E: Tensor, capacity: int) -> bool:
    """Whether any expert is asked for more than ``capacity`` slots (one host read)."""
    return bool(to_host((routed_E > capacity).any(), "capacity overflow"))


def _bincount(experts_S: Tensor, valid_S: Tensor | None, num_experts: int) -> Tensor:
    """Slots per expert, counting only valid slots; (E,) int64."""
    if valid_S is not None:
        experts_S = experts_S[valid_S]
    return torch.bincount(experts_S, minlength=num_experts)


def _sort_by_expert(experts_S: Tensor, keep_S: Tensor | None) -> Tensor:
    """Indices of the kept slots, stably sorted by expert: (S,) int64."""
    if keep_S is None:
        return torch.sort(experts_S, stable=True).indices
    idx_S = keep_S.nonzero().squeeze(1)
    return idx_S.index_select(0, torch.sort(experts_S[idx_S], stable=True).indices)


def _within_capacity(
    experts_S: Tensor,
    weights_TK: Tensor,
    valid_S: Tensor | None,
    num_experts: int,
    capacity: int | Tensor,
    policy: DropPolicy,
) -> Tensor:
    """(T·K,) bool: slot is valid and within the first C of its expert by priority."""
    T, K = weights_TK.shape
    if policy == "score":
        priority_S = torch.argsort(weights_TK.detach().reshape(-1), descending=True, stable=True)
    else:  # choice-major: all first choices (in token order), then all second choices, ...
        priority_S = torch.arange(T * K, device=experts_S.device).view(T, K).t().reshape(-1)
    if valid_S is not None:
        priority_S = priority_S[valid_S[priority_S]]
    by_expert = torch.sort(experts_S[priority_S], stable=True)
    ordered_S = priority_S[by_expert.indices]
    counts_E = torch.bincount(by_expert.values, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_S = torch.arange(ordered_S.numel(), device=experts_S.device) - starts_E[by_expert.values]
    keep_S = torch.zeros(T * K, dtype=torch.bool, device=experts_S.device)
    cap_S = capacity[by_expert.values] if isinstance(capacity, Tensor) else capacity
    keep_S[ordered_S[rank_S < cap_S]] = True
    return keep_S


def permute(x_TD: Tensor, p: Plan) -> Tensor:
    """Gather token rows into expert order: (T, D) -> (S, D)."""
    return x_TD.index_select(0, p.token_S)


def unpermute(y_SD: Tensor, p: Plan, num_tokens: int) -> Tensor:
    """Weight each slot's output by its gate and sum per token: (S, D) -> (T, D).

    Dropped and masked slots contribute nothing; their tokens keep only the residual path.
    """
    y_SD = y_SD * p.weight_S.to(y_SD.dtype).unsqueeze(1)
    out_TD = y_SD.new_zeros(num_tokens, y_SD.shape[1])
    return out_TD.index_add(0, p.token_S, y_SD)


def plan_with_reroute(
    experts_TK: Tensor,
    weights_TK: Tensor,
    scores_TE: Tensor,
    num_experts: int,
    *,
    capacity: int,
    policy: DropPolicy = "score",
    mask_TK: Tensor | None = None,
    normalize: bool = True,
    routed_E: Tensor | None = None,
) -> Plan:
    """Plan, then move each dropped slot to the token's best expert not yet chosen (one round).

    Switch's "No-Token-Left-Behind": re-routed slots only fill room left after the first
    round; they carry the score of their new expert (divided by the token's original weight
    sum when ``normalize``). Slots that still find no room are dropped. ``routed_E`` stays the
    first-round load (what the router asked for).
    """
    first = plan(
        experts_TK,
        weights_TK,
        num_experts,
        capacity=capacity,
        policy=policy,
        mask_TK=mask_TK,
        routed_E=routed_E,
    )
    if capacity == 0 or to_host(first.dropped, "dropped slots to re-route") == 0:
        return first
    dropped_TK = ~first.kept_TK if mask_TK is None else mask_TK & ~first.kept_TK
    taken_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(1, experts_TK, True)
    ranked_TE = scores_TE.detach().masked_fill(taken_TE, float("-inf"))
    alt_TK = torch.topk(ranked_TE, experts_TK.shape[1], dim=1).indices
    alt_w_TK = scores_TE.gather(1, alt_TK)
    if normalize:
        alt_w_TK = alt_w_TK / scores_TE.gather(1, experts_TK).sum(1, keepdim=True)
    new_experts_TK = torch.where(dropped_TK, alt_TK, experts_TK)
    new_weights_TK = torch.where(dropped_TK, alt_w_TK, weights_TK)
    room_E = capacity - first.kept_E
    second = plan(
        new_experts_TK,
        new_weights_TK,
        num_experts,
        capacity=room_E,
        policy=policy,
        mask_TK=dropped_TK,
    )
    final = plan(
        new_experts_TK,
        new_weights_TK,
        num_experts,
        mask_TK=first.kept_TK | (second.kept_TK & dropped_TK),
    )
    return dataclasses.replace(final, routed_E=first.routed_E, capacity=capacity)


# ----------------------------------------------------------------------------- dispatchers


@dataclass(frozen=True)
class Load:
    """The computation batch's routed counts: batch_E (E,) summed over the data ranks that
    share it (this micro-batch alone in one process); routed_WE (W, E) per rank, or None;
    prices_E (E,): a Quantile Balancing price estimate averaged over those ranks, or None."""

    batch_E: Tensor
    routed_WE: Tensor | None = None
    prices_E: Tensor | None = None


@dataclass(frozen=True)
class Combined:
    """A dispatcher's result: output_TD (T, D) the gate-weighted expert outputs; routed_E and
    kept_E (E,) the computation batch's slots per expert before / after drops; stats: extra
    detached diagnostics (under EP ``rank_load`` (W,) and ``dropped_rank`` (W,))."""

    output_TD: Tensor
    routed_E: Tensor
    kept_E: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)

    @property
    def dropped(self) -> Tensor:
        """Dropped slots of the computation batch (0-dim int64)."""
        return self.routed_E.sum() - self.kept_E.sum()


class Dispatcher(Protocol):
    """Moves planned slots to their experts and the results back (see the module docstring)."""

    def load(self, routed_E: Tensor, prices_E: Tensor | None = None) -> Load: ...

    def combine(self, x_TD: Tensor, p: Plan, experts: nn.Module, load: Load) -> Combined:
        """experts: the layer's (local) ``moelab.experts.Experts``."""
        ...


class LocalDispatcher:
    """One process: the computation batch is this micro-batch; permute, experts on contiguous
    segments and unpermute run as one autograd node (``Experts.forward_tokens``), equal to
    ``unpermute(experts(permute(x)))`` with a third of the saved activations."""

    def load(self, routed_E: Tensor, prices_E: Tensor | None = None) -> Load:
        return Load(routed_E, None, prices_E)

    def combine(self, x_TD: Tensor, p: Plan, experts: nn.Module, load: Load) -> Combined:
        y_TD = experts.forward_tokens(x_TD, p.token_S, p.weight_S, p.sizes)
        return Combined(y_TD, p.routed_E, p.kept_E)
