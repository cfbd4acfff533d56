"""Find the MoE routers of a transformers model, capture their routing, re-run their selection.

Shape legend: T tokens (batch × sequence, flattened as the router sees them), D hidden size,
E routed experts, K experts per token (``num_experts_per_tok``).

In transformers 5 every supported router is its own module (``...mlp.gate``) whose forward maps
hidden states ``(T, D)`` (or ``(B, L, D)``) to ``(logits_TE, weights_TK, experts_TK)``: the
experts it returns are the ones the model really uses, so :func:`capture_routing` records them
as they are. Older gates that are a plain ``nn.Linear`` returning logits are still profiled by
re-applying top-k of the softmax. :func:`select` reproduces each known router's own rule (top-k
of softmax for Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE; DeepSeek-V3's sigmoid + correction bias
+ group-limited top-k) with an extra selection-only bias, which is how :mod:`moelab.hf.attach`
puts loss-free balancing on the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import ScoreFn
from moelab.routing import score_fn

SUPPORTED = "Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3"


class NoMoERouterError(ValueError):
    """The model has no MoE router moelab can find (a dense model, or an unknown MoE layout)."""


@dataclass(frozen=True)
class RouterRule:
    """How one router class turns logits into (weights, experts); mirrors its own forward.

    score: ``softmax`` over all E, or ``sigmoid`` (DeepSeek-V3).
    normalize_attr: attribute that switches weight renormalisation (``None`` = always on).
    fp32_logits: logits computed from fp32 copies of input and weight (DeepSeek-V3).
    cast_weights: weights cast back to the logits dtype (Qwen, OLMoE; Mixtral keeps fp32).
    grouped: group-limited top-k with ``e_score_correction_bias`` and ``routed_scaling_factor``.
    """

    score: ScoreFn
    normalize_attr: str | None
    fp32_logits: bool = False
    cast_weights: bool = True
    grouped: bool = False


RULES: dict[str, RouterRule] = {
    "MixtralTopKRouter": RouterRule("softmax", None, cast_weights=False),
    "Qwen2MoeTopKRouter": RouterRule("softmax", "norm_topk_prob"),
    "Qwen3MoeTopKRouter": RouterRule("softmax", "norm_topk_prob"),
    "OlmoeTopKRouter": RouterRule("softmax", "norm_topk_prob"),
    "DeepseekV3TopkRouter": RouterRule(
        "sigmoid", "norm_topk_prob", fp32_logits=True, cast_weights=False, grouped=True
    ),
}


@dataclass(frozen=True)
class RouterSite:
    """One MoE router inside a model.

    name: module path (``model.layers.3.mlp.gate``); layer: decoder-layer index in the model;
    rule: the known selection rule, ``None`` for an unknown router class (profiling only).
    """

    name: str
    layer: int
    module: nn.Module
    num_experts: int
    top_k: int
    rule: RouterRule | None

    @property
    def score(self) -> ScoreFn:
        """Score function of the routing distribution (softmax unless the rule says sigmoid)."""
        return self.rule.score if self.rule else "softmax"


_LAYER_RE = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def _top_k(model: nn.Module, module: nn.Module) -> int:
    k = getattr(model.config, "num_experts_per_tok", None) or getattr(module, "top_k", None)
    if not k:
        raise NoMoERouterError(f"{type(module).__name__}: cannot find top-k in the model config")
    return int(k)


def find_routers(model: nn.Module) -> list[RouterSite]:
    """All MoE routers: modules named ``gate``/``router`` beside an ``experts`` module.

    Raises :class:`NoMoERouterError` (one line) when there is none, e.g. for a dense Llama.
    """
    sites = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = modules.get(parent_name)
        if leaf not in ("gate", "router") or parent is None or not hasattr(parent, "experts"):
            continue
        weight = getattr(module, "weight", None)
        match = _LAYER_RE.search(name)
        if weight is None or weight.dim() != 2 or match is None:
            continue
        rule = RULES.get(type(module).__name__)
        sites.append(
            RouterSite(
                name, int(match.group(1)), module, weight.shape[0], _top_k(model, module), rule
            )
        )
    if not sites:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise NoMoERouterError(
            f"model type {kind!r} has no MoE router (no 'gate'/'router' module beside 'experts'); "
            f"moelab.hf supports MoE models such as {SUPPORTED}"
        )
    return sites


# ----------------------------------------------------------------------------- selection rules


def _grouped_choice(site: RouterSite, choice_TE: Tensor) -> Tensor:
    """DeepSeek-V3 group-limited routing: keep the ``topk_group`` groups whose two best scores
    sum highest, mask the other experts to -inf (DeepSeek-V3 §2.1.2, node-limited routing)."""
    m, E = site.module, site.num_experts
    groups = m.num_group
    group_scores_TG = choice_TE.view(-1, groups, E // groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores_TG, k=m.topk_group, dim=-1, sorted=False)[1]
    group_mask_TG = torch.zeros_like(group_scores_TG).scatter_(1, group_idx, 1)
    keep_TE = group_mask_TG.unsqueeze(-1).expand(-1, groups, E // groups).reshape(-1, E)
    return choice_TE.masked_fill(~keep_TE.bool(), float("-inf"))


def select(site: RouterSite, logits_TE: Tensor, bias_E: Tensor | None) -> tuple[Tensor, Tensor]:
    """Re-run the router's own selection with a selection-only bias.

    logits_TE ``(T, E)`` -> (weights_TK, experts_TK). ``bias_E`` ``(E,)`` is added to the scores
    used to *choose* experts; the weights gather the unbiased scores, so they are the model's own
    (Wang et al. 2024, loss-free balancing, eq. 3). With ``bias_E=None`` the result equals the
    model's forward bit for bit.
    """
    rule = site.rule
    if rule is None:
        raise NoMoERouterError(f"{site.name}: router class {type(site.module).__name__} is unknown")
    scores_TE = score_fn(logits_TE.float(), rule.score)
    choice_TE = scores_TE
    if rule.grouped:
        choice_TE = choice_TE + site.module.e_score_correction_bias
    if bias_E is not None:
        choice_TE = choice_TE + bias_E.to(choice_TE)
    if rule.grouped:
        choice_TE = _grouped_choice(site, choice_TE)
    experts_TK = torch.topk(choice_TE, site.top_k, dim=-1, sorted=not rule.grouped)[1]
    weights_TK = scores_TE.gather(1, experts_TK)
    if rule.normalize_attr is None or getattr(site.module, rule.normalize_attr):
        eps = 1e-20 if rule.grouped else 0.0  # DeepSeek-V3 adds 1e-20 to the denominator
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + eps)
    if rule.grouped:
        weights_TK = weights_TK * site.module.routed_scaling_factor
    if rule.cast_weights:
        weights_TK = weights_TK.to(logits_TE.dtype)
    return weights_TK, experts_TK


def router_logits(site: RouterSite, hidden: Tensor) -> Tensor:
    """The router's logits ``(T, E)`` for hidden states ``(..., D)``, in its own precision."""
    weight_ED = site.module.weight
    hidden_TD = hidden.reshape(-1, weight_ED.shape[1])
    if site.rule is not None and site.rule.fp32_logits:
        return F.linear(hidden_TD.float(), weight_ED.float())
    return F.linear(hidden_TD, weight_ED)


# ----------------------------------------------------------------------------- capture

OnRoute = Callable[[int, Tensor, Tensor], None]


def _unpack(site: RouterSite, output: object) -> tuple[Tensor, Tensor]:
    """(logits_TE, experts_TK) from a router output: the model's own indices when it returns
    them, else top-k of the softmax of plain logits (transformers 4 ``nn.Linear`` gates)."""
    if isinstance(output, tuple) and len(output) >= 3 and not output[2].is_floating_point():
        logits_TE = output[0].reshape(-1, site.num_experts)
        return logits_TE, output[2].reshape(logits_TE.shape[0], -1)
    if isinstance(output, tuple):
        output = output[0]
    logits_TE = output.reshape(-1, site.num_experts)
    scores_TE = score_fn(logits_TE.float(), site.score)
    return logits_TE, torch.topk(scores_TE, site.top_k, dim=-1)[1]


@contextmanager
def capture_routing(sites: list[RouterSite], on_route: OnRoute) -> Iterator[None]:
    """Call ``on_route(site_index, logits_TE, experts_TK)`` (detached) on every router forward."""

    def make_hook(i: int, site: RouterSite) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            logits_TE, experts_TK = _unpack(site, output)
            on_route(i, logits_TE.detach(), experts_TK.detach())

        return hook

    handles = [s.module.register_forward_hook(make_hook(i, s)) for i, s in enumerate(sites)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
