"""Router selection rules of transformers MoE families: data, one function, and inference.

Shape legend: T tokens, E experts (the router's score columns), K experts per token, G groups.

A :class:`Rule` says how a router turns its logits ``(T, E)`` into ``(weights_TK, experts_TK)``:
which score function, whether top-k is taken on the scores or on the raw logits (then the score
of the k chosen), renormalisation, expert groups, a scaling factor and where the model keeps a
selection bias. :func:`select` applies a rule, with an extra selection-only bias (loss-free
balancing, Wang et al. 2024 eq. 3). :func:`infer_rule` finds the rule of an unknown router by
checking :func:`candidates` against the router's own forward on a probe batch: exact equality
of experts and weights, nothing approximate.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor, nn

from moelab.routing import score_fn

Score = Literal["softmax", "sigmoid", "sqrtsoftplus", "logits"]
Order = Literal["score_topk", "topk_score"]
Groups = Literal["none", "top2_sum", "max"]
SCORES: tuple[Score, ...] = ("softmax", "sigmoid", "sqrtsoftplus")


@dataclass(frozen=True)
class Rule:
    """One router's selection rule, as data (see the module docstring).

    score: score function over the E columns. order: ``score_topk`` = top-k of the (biased)
    scores, weights gather the unbiased scores (Mixtral, DeepSeek-V3); ``topk_score`` = top-k of
    the raw logits, weights = score of the k chosen logits (softmax over k: Granite, GPT-OSS;
    sigmoid of each: Llama-4). normalize: ``True``, ``False`` or the router attribute that
    switches it (``norm_topk_prob``). eps: added to the renormalising sum (DeepSeek-V3: 1e-20).
    groups: group-limited top-k (``top2_sum``: groups ranked by their two best scores,
    DeepSeek-V3; ``max``: by the best, DeepSeek-V2), sizes from ``num_group``/``topk_group``.
    scale: router attribute multiplying the weights (``routed_scaling_factor``). sorted: the
    order of the k experts (``torch.topk(sorted=...)``). fp32: logits in fp32 before scoring.
    cast: weights cast back to the logits' dtype. expert_scale: router attribute ``(E,)`` whose
    entry of each chosen expert multiplies its weight (Gemma-4's ``per_expert_scale``). per_k:
    weights divided by k (OpenAI's privacy filter).
    """

    score: Score = "softmax"
    order: Order = "score_topk"
    normalize: bool | str = True
    eps: float = 0.0
    groups: Groups = "none"
    scale: str | None = None
    sorted: bool = True
    fp32: bool = True
    cast: bool = False
    expert_scale: str | None = None
    per_k: bool = False

    def describe(self) -> str:
        """One line for the docs table, e.g. ``softmax → top-k, renormalised``."""
        score = "raw logits" if self.score == "logits" else self.score
        if self.order == "topk_score":
            text = f"top-k of logits → {score} of the k"
        else:
            text = f"{score} → top-k"
        if self.groups != "none":
            text += f", group-limited ({self.groups})"
        norm = {True: "renormalised", False: "not renormalised"}.get(self.normalize)
        text += f", {norm or f'renormalised if {self.normalize}'}"
        if self.scale:
            text += f", × {self.scale}"
        if self.expert_scale:
            text += f", × {self.expert_scale}[expert]"
        if self.per_k:
            text += ", ÷ k"
        return text


def _scores(rule: Rule, logits_TE: Tensor) -> Tensor:
    x_TE = logits_TE.float() if rule.fp32 else logits_TE
    return x_TE if rule.score == "logits" else score_fn(x_TE, rule.score)


def _group_mask(rule: Rule, choice_TE: Tensor, module: nn.Module) -> Tensor:
    """Mask experts outside the ``topk_group`` best of ``num_group`` groups (-inf or 0)."""
    G, E = int(module.num_group), choice_TE.shape[-1]
    grouped_TGM = choice_TE.view(-1, G, E // G)
    if rule.groups == "top2_sum":
        group_TG = grouped_TGM.topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_TG = grouped_TGM.max(dim=-1).values
    idx_TG = torch.topk(group_TG, k=int(module.topk_group), dim=-1, sorted=False)[1]
    keep_TG = torch.zeros_like(group_TG).scatter_(1, idx_TG, 1)
    keep_TE = keep_TG.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E).bool()
    fill = float("-inf") if rule.groups == "top2_sum" else 0.0
    return choice_TE.masked_fill(~keep_TE, fill)


def _normalize_on(rule: Rule, module: nn.Module) -> bool:
    if isinstance(rule.normalize, str):
        return bool(getattr(module, rule.normalize, False))
    return rule.normalize


def select(
    rule: Rule,
    logits_TE: Tensor,
    module: nn.Module,
    *,
    own_bias_E: Tensor | None = None,
    bias_E: Tensor | None = None,
    top_k: int,
) -> tuple[Tensor, Tensor]:
    """Apply ``rule``: logits ``(T, E)`` -> (weights_TK, experts_TK).

    own_bias_E: the model's own selection bias (``e_score_correction_bias``), bias_E: moelab's
    loss-free bias; both are added to the scores that *choose* experts only, the weights gather
    the unbiased scores (Wang et al. 2024 eq. 3). With ``bias_E=None`` the result equals the
    router's own forward bit for bit when ``rule`` is its rule.
    """
    scores_TE = _scores(rule, logits_TE)
    choice_TE = logits_TE.float() if rule.order == "topk_score" and rule.fp32 else logits_TE
    choice_TE = scores_TE if rule.order == "score_topk" else choice_TE
    if own_bias_E is not None:
        choice_TE = choice_TE + own_bias_E.to(choice_TE)
    if bias_E is not None:
        choice_TE = choice_TE + bias_E.to(choice_TE)
    if rule.groups != "none":
        choice_TE = _group_mask(rule, choice_TE, module)
    experts_TK = torch.topk(choice_TE, top_k, dim=-1, sorted=rule.sorted)[1]
    if rule.order == "topk_score":
        raw_TK = (logits_TE.float() if rule.fp32 else logits_TE).gather(1, experts_TK)
        weights_TK = score_fn(raw_TK, rule.score) if rule.score != "logits" else raw_TK
    else:
        weights_TK = scores_TE.gather(1, experts_TK)
    if _normalize_on(rule, module):
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + rule.eps)
    if rule.scale:
        weights_TK = weights_TK * getattr(module, rule.scale)
    if rule.expert_scale:
        weights_TK = weights_TK * getattr(module, rule.expert_scale)[experts_TK]
    if rule.per_k:
        weights_TK = weights_TK / top_k
    if rule.cast:
        weights_TK = weights_TK.to(logits_TE.dtype)
    return weights_TK, experts_TK


# ----------------------------------------------------------------------------- inference

SCALE_ATTRS = ("routed_scaling_factor", "route_scale", "router_scaling_factor")


def candidates(module: nn.Module) -> Iterator[Rule]:
    """Every rule worth trying for ``module``: groups and scale from its attributes, the rest
    enumerated (scores × order × normalisation × eps × sorted × fp32 × cast)."""
    scale = next((a for a in SCALE_ATTRS if isinstance(getattr(module, a, None), float)), None)
    groups: tuple[Groups, ...] = ("none",)
    if int(getattr(module, "num_group", 1) or 1) > 1 and getattr(module, "topk_group", None):
        groups = ("top2_sum", "max", "none")
    norms: tuple[bool | str, ...] = (True, False)
    if hasattr(module, "norm_topk_prob"):
        norms = ("norm_topk_prob", True, False)
    for score, order, norm, eps, grp, srt, fp32, cast in itertools.product(
        SCORES, ("score_topk", "topk_score"), norms, (0.0, 1e-20, 1e-6), groups,
        (True, False), (True, False), (False, True),
    ):  # fmt: skip
        if order == "topk_score" and (eps or grp != "none" or norm is not False):
            continue  # a softmax over the k chosen needs no renormalising: the simpler rule
        yield Rule(score, order, norm, eps, grp, scale, srt, fp32, cast)
    for score in ("sigmoid", "sqrtsoftplus"):  # the k chosen scored, then renormalised
        yield Rule(score, "topk_score", True, 0.0, "none", scale)


def matches(
    rule: Rule,
    logits_TE: Tensor,
    module: nn.Module,
    weights_TK: Tensor,
    experts_TK: Tensor,
    own_bias_E: Tensor | None,
) -> bool:
    """Whether ``rule`` reproduces the router's own (weights, experts) exactly."""
    try:
        w_TK, e_TK = select(
            rule, logits_TE, module, own_bias_E=own_bias_E, top_k=experts_TK.shape[-1]
        )
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return False
    return (
        torch.equal(e_TK, experts_TK.reshape(e_TK.shape))
        and w_TK.dtype == weights_TK.dtype
        and torch.equal(w_TK, weights_TK.reshape(w_TK.shape))
    )


def infer_rule(
    module: nn.Module,
    logits_TE: Tensor,
    weights_TK: Tensor,
    experts_TK: Tensor,
    own_bias_E: Tensor | None = None,
    first: Rule | None = None,
) -> Rule | None:
    """The first candidate rule (``first`` tried before the rest) that reproduces the router's
    output on a probe batch exactly, or None when none does."""
    tries = itertools.chain([first] if first else [], candidates(module))
    for rule in tries:
        if matches(rule, logits_TE, module, weights_TK, experts_TK, own_bias_E):
            return rule
        if first is not None and rule is first:
            continue
    return None


def with_scale(rule: Rule, module: nn.Module) -> Rule:
    """``rule`` with its scale attribute dropped when ``module`` has none (older configs)."""
    if rule.scale and not hasattr(module, rule.scale):
        return replace(rule, scale=None)
    return rule
