"""What a router call returns: reading it, re-selecting with a bias, writing it back.

Shape legend: T tokens, E real experts, N null experts, C = E + N score columns, K top-k,
B sequences, L sequence length.

A router's output is read by the layout its :class:`moelab.hf.routers.RouterSite` gives
(``logits``, ``probs``, ``weights``, ``experts``, ``dense``, ``mask``, ``plan``, ``-``; see
:mod:`moelab.hf.families`): :func:`recorded_scores`, :func:`experts_of`, :func:`weights_of`.
:func:`select` re-runs the family's rule with moelab's selection-only bias and
:func:`replace_choice` puts its weights and experts back in the same layout, shapes and
dtypes; :func:`write_slot` writes the bias into a family's own bias slot instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moelab.hf import rules as R
from moelab.routing import score_fn

if TYPE_CHECKING:
    from moelab.hf.routers import RouterSite


class NoRuleError(ValueError):
    """A router's output or rule does not allow what was asked (one line)."""


def _tensors(output: object) -> tuple:
    return output if isinstance(output, tuple) else (output,)


def _pick(out: tuple, layout: tuple[str, ...], what: str) -> Tensor | None:
    return out[layout.index(what)] if what in layout and layout.index(what) < len(out) else None


def recorded_scores(site: RouterSite, output: object) -> Tensor:
    """The router's recorded logits (or probabilities) ``(T, C)`` from its output."""
    out = _tensors(output)
    src = _pick(out, site.output, "logits")
    src = _pick(out, site.output, "probs") if src is None else src
    if src is None:
        raise NoRuleError(f"{site.name}: the router output has no logits")
    return src.reshape(-1, src.shape[-1])


def own_bias(site: RouterSite) -> Tensor | None:
    """The model's own selection bias ``(C,)`` as the rule adds it, or None."""
    slot = site.bias_slot()
    return None if slot is None else slot.reshape(-1)


def experts_of(site: RouterSite, output: object, logits_TE: Tensor) -> Tensor | None:
    """The experts ``(T, K)`` a router call chose (see ``capture``); None when only the experts
    module's input has them."""
    out = _tensors(output)
    if site.capture == "rule":
        return rule_select(site, logits_TE, None)[1]
    if site.capture == "output":
        experts = _pick(out, site.output, "experts")
        if experts is not None:
            return experts.reshape(logits_TE.shape[0], -1)
        mask = _pick(out, site.output, "mask")
        if mask is not None:  # one-hot dispatch mask: the chosen expert, C when dropped
            mask_TE = mask.reshape(-1, mask.shape[-1])
            chosen_T = mask_TE.argmax(-1).masked_fill(mask_TE.sum(-1) == 0, site.columns)
            return chosen_T[:, None]
    return None


def rule_select(
    site: RouterSite, logits_TE: Tensor, bias_E: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The family's rule on ``(T, C)`` logits with the model's own bias and moelab's
    ``bias_E`` ``(E,)`` (the null columns get none)."""
    if site.rule is None:
        raise NoRuleError(f"{site.name}: router {type(site.module).__name__} has no rule")
    if bias_E is not None and site.num_null:
        bias_E = torch.cat([bias_E, bias_E.new_zeros(site.num_null)])
    return R.select(
        site.rule, logits_TE, site.module, own_bias_E=own_bias(site), bias_E=bias_E,
        top_k=site.top_k,
    )  # fmt: skip


def select(site: RouterSite, logits_TE: Tensor, bias_E: Tensor | None) -> tuple[Tensor, Tensor]:
    """Re-run the router's own selection with a selection-only bias ``(E,)``.

    logits_TE ``(T, C)`` -> (weights_TK, experts_TK). The bias is added to the scores used to
    *choose* experts; the weights gather the unbiased scores, so they are the model's own
    (Wang et al. 2024, loss-free balancing, eq. 3). With ``bias_E=None`` the result equals the
    router's forward bit for bit (checked on the probe when the rule was inferred).
    """
    return rule_select(site, logits_TE, bias_E)


def weights_of(site: RouterSite, output: object) -> Tensor | None:
    """The gate weights ``(T, K)`` of a router call, or None when its output has none."""
    weights = _pick(_tensors(output), site.output, "weights")
    return None if weights is None else weights.reshape(-1, weights.shape[-1])


def scores_of(site: RouterSite, logits_TC: Tensor) -> Tensor:
    """The routing scores ``(T, E)`` of the real experts from the recorded tensor."""
    if site.probs_recorded:
        return logits_TC[:, : site.num_experts].float()
    return score_fn(logits_TC.float(), site.score)[:, : site.num_experts]


def replace_choice(site: RouterSite, output: object, weights_TK: Tensor, experts_TK: Tensor):
    """The router output with its weights and experts replaced (same shapes and dtypes)."""
    out = list(_tensors(output))
    for j, what in enumerate(site.output[: len(out)]):
        old = out[j]
        if what == "weights":
            out[j] = weights_TK.to(old.dtype).reshape(old.shape)
        elif what == "experts":
            out[j] = experts_TK.to(old.dtype).reshape(old.shape)
        elif what == "dense":  # (T, C) zero but for the chosen experts' weights
            dense_TC = torch.zeros_like(old.reshape(-1, old.shape[-1]))
            out[j] = dense_TC.scatter(1, experts_TK, weights_TK.to(old.dtype)).reshape(old.shape)
        elif what == "mask":
            out[j] = _capacity_mask(site, experts_TK, old)
        elif what == "plan":
            out[j : j + 4] = _dispatch_plan(site, weights_TK.to(out[j + 2].dtype), experts_TK)
    return tuple(out) if isinstance(output, tuple) else out[0]


def _capacity_mask(site: RouterSite, experts_TK: Tensor, old: Tensor) -> Tensor:
    """Switch's one-hot dispatch mask ``(B, L, E)`` of the chosen expert, the tokens past the
    router's ``expert_capacity`` (in sequence order) masked out."""
    one_hot = torch.nn.functional.one_hot(experts_TK[:, 0], old.shape[-1]).reshape(old.shape)
    priority = torch.cumsum(one_hot, dim=-2)
    return (one_hot * (priority <= site.module.expert_capacity)).to(old.dtype)


def _dispatch_plan(site: RouterSite, weights_TK: Tensor, experts_TK: Tensor) -> list:
    """JetMoE's plan from (weights, experts): slots sorted by expert, their token index and
    gate, and the number of slots per expert (a list), as ``JetMoeTopKGating`` returns it."""
    K = experts_TK.shape[1]
    hit_TE = torch.zeros(experts_TK.shape[0], site.num_experts, device=experts_TK.device)
    sizes = hit_TE.scatter(1, experts_TK, 1).long().sum(0).tolist()
    sorted_S = experts_TK.flatten().sort(0)[1]
    gates_S = weights_TK.flatten()[sorted_S]
    return [sorted_S, sorted_S.div(K, rounding_mode="trunc"), gates_S, sizes]


@torch.no_grad()
def write_slot(site: RouterSite, slot0: Tensor, bias_E: Tensor) -> None:
    """The family's bias slot = its value at attach + moelab's bias, on the E real experts."""
    slot_C = site.bias_slot().view(-1)
    E = site.num_experts
    slot_C[:E].copy_(slot0.view(-1)[:E] + bias_E.to(slot_C))
