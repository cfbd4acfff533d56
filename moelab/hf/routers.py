"""Find the MoE routers of a transformers model, capture their routing, re-run their selection.

Shape legend: T tokens (batch × sequence, flattened as the router sees them), D hidden size,
E routed experts, N null experts, C = E + N score columns, K experts per token.

An MoE block is a module with an ``experts`` child; its router is the child whose class is in
the family registry (:mod:`moelab.hf.families`), else its ``gate`` / ``router`` child.
:func:`find_routers` runs one small probe forward (64 random tokens, no gradient) to see what
each router returns; a router class in no registry row gets its rule inferred there from its
own output (:func:`moelab.hf.rules.infer_rule`). :func:`capture_routing` then records, on every
router call, the scores' source ``(T, C)`` and the experts ``(T, K)`` the model really uses:
from the router's output where it returns them, else from the experts module's input, else by
the family's rule (Llama-4's dense scores, JetMoE, Zaya's masked null expert).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.hf import rules as R
from moelab.hf.families import Family, lookup
from moelab.hf.outputs import _pick, _tensors, experts_of, own_bias, recorded_scores

SUPPORTED = "every MoE family of transformers with an `experts` module (docs/hf.md)"
ROUTER_NAMES = ("gate", "router")
PROBE_TOKENS = (4, 16)


class NoMoERouterError(ValueError):
    """The model has no MoE router moelab can find (a dense model, or an unknown MoE layout)."""


@dataclass
class RouterSite:
    """One MoE router inside a model.

    name: module path (``model.layers.3.mlp.gate``); layer: decoder-layer index; block: the
    MoE block holding it; num_experts E (real experts) and num_null N (null / identity
    experts, score columns E..E+N-1); rule: the selection rule, ``None`` when it is unknown or
    not a rule; family: the registry row (``None`` for an unregistered class); output: the
    router forward's outputs by position; capture: where the experts are read (``output``,
    ``experts`` = the experts module's input, ``rule``); fired: the probe reached it.
    """

    name: str
    layer: int
    module: nn.Module
    block: nn.Module
    num_experts: int
    top_k: int
    rule: R.Rule | None
    family: Family | None = None
    output: tuple[str, ...] = ("logits", "weights", "experts")
    capture: str = "output"
    num_null: int = 0
    fired: bool = True
    inferred: bool = False
    experts: nn.Module | None = None
    extra: dict = field(default_factory=dict)

    @property
    def columns(self) -> int:
        """C = E + N score columns of the router."""
        return self.num_experts + self.num_null

    @property
    def score(self) -> str:
        """Score function of the routing distribution, for statistics and balance terms
        (``softmax`` where the recorded tensor is already probabilities)."""
        if self.rule is None or "probs" in self.output or self.rule.score == "logits":
            return "softmax"
        return self.rule.score

    @property
    def probs_recorded(self) -> bool:
        return "probs" in self.output

    def bias_slot(self) -> Tensor | None:
        """The family's own selection-bias tensor (``router.X`` / ``block.X``), or None."""
        path = self.family.bias if self.family else self.extra.get("bias")
        if not path:
            return None
        owner, _, attr = path.partition(".")
        obj = self.module if owner == "router" else self.block
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, Tensor) else None


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers?|blocks|block)\.(\d+)\.")


BIAS_SLOTS = (
    "router.e_score_correction_bias", "router.moe_statics.e_score_correction_bias",
    "router.balancing_biases", "block.e_score_correction_bias", "block.expert_bias",
)  # fmt: skip


def _router_child(block: nn.Module) -> tuple[str, nn.Module] | None:
    children = dict(block.named_children())
    for child_name, child in children.items():
        if lookup(type(child).__name__) is not None:
            return child_name, child
    for child_name in ROUTER_NAMES:
        if isinstance(children.get(child_name), nn.Module):
            return child_name, children[child_name]
    return None


def _blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module, nn.Module]]:
    """(router path, router, block, experts): every registered router class (the block is its
    parent), and every other module with an ``experts`` child and a ``gate``/``router``."""
    modules = dict(model.named_modules())
    seen = set()
    for name, module in modules.items():
        fam = lookup(type(module).__name__)
        parent = modules.get(name.rpartition(".")[0]) if name else None
        experts = getattr(parent, fam.experts, None) if fam and parent is not None else None
        if isinstance(experts, nn.Module):
            seen.add(id(parent))
            yield name, module, parent, experts
    for name, block in modules.items():
        experts = getattr(block, "experts", None)
        if id(block) in seen or not isinstance(experts, nn.Module):
            continue
        found = _router_child(block)
        if found is not None and lookup(type(found[1]).__name__) is None:
            yield (f"{name}.{found[0]}" if name else found[0]), found[1], block, experts


def _top_k(model: nn.Module, module: nn.Module) -> int:
    for obj, attr in ((module, "top_k"), (model.config, "num_experts_per_tok")):
        k = getattr(obj, attr, None)
        if isinstance(k, int) and k > 0:
            return k
    text = getattr(model.config, "get_text_config", lambda: None)()
    k = getattr(text, "num_experts_per_tok", None) or getattr(text, "top_k_experts", None)
    if not k:
        raise NoMoERouterError(f"{type(module).__name__}: cannot find top-k in the model config")
    return int(k)


def _null_count(fam: Family | None, model: nn.Module) -> int:
    if fam is None or fam.null is None:
        return 0
    if fam.null == "last":
        return 1
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    return int(getattr(config, fam.null, 0) or 0)


# ----------------------------------------------------------------------------- the probe


@dataclass
class ProbeCall:
    """What one router call saw and returned in the probe forward."""

    output: object
    experts_in: Tensor | None = None  # (T, K) the experts module's integer input
    weights_in: Tensor | None = None


def _int_arg(args: tuple) -> int | None:
    for j, a in enumerate(args):
        if isinstance(a, Tensor) and not a.is_floating_point() and a.dim() >= 1:
            return j
    return None


@torch.no_grad()
def probe(
    model: nn.Module, routers: list[nn.Module], experts: list[nn.Module]
) -> dict[int, ProbeCall]:
    """One forward on 64 random tokens (eval mode, its own RNG): each router's first call."""
    calls: dict[int, ProbeCall] = {}
    handles = []
    for i, (router, exp) in enumerate(zip(routers, experts, strict=True)):

        def on_router(m, a, out, i=i):
            calls.setdefault(i, ProbeCall(out))

        def on_experts(m, a, i=i):
            j = _int_arg(a)
            if i in calls and j is not None and calls[i].experts_in is None:
                calls[i].experts_in = a[j]
                w = a[j + 1] if len(a) > j + 1 and isinstance(a[j + 1], Tensor) else None
                calls[i].weights_in = w

        handles.append(router.register_forward_hook(on_router))
        handles.append(exp.register_forward_pre_hook(on_experts))
    vocab = int(getattr(model.config.get_text_config(), "vocab_size", 2) or 2)
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids_BL = torch.randint(0, max(vocab, 2), PROBE_TOKENS, generator=gen).to(device)
    was_training = model.training
    model.eval()
    try:
        model(**model_inputs(model, ids_BL))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return calls


def model_inputs(model: nn.Module, ids_BL: Tensor) -> dict:
    """Keyword arguments of a text-only forward: input_ids (and decoder_input_ids for seq2seq)."""
    kw = {"input_ids": ids_BL, "use_cache": False}
    if getattr(model.config, "is_encoder_decoder", False):
        kw["decoder_input_ids"] = ids_BL
    return kw


def _guess_output(out: tuple, top_k: int) -> tuple[str, ...]:
    """Output layout of an unregistered router from its tensors' dtypes and shapes."""
    names = []
    for t in out:
        if not isinstance(t, Tensor):
            names.append("-")
        elif not t.is_floating_point():
            names.append("experts" if "experts" not in names and t.shape[-1] == top_k else "-")
        elif t.shape[-1] == top_k and "weights" not in names:
            names.append("weights")
        elif "logits" not in names:
            names.append("logits")
        else:
            names.append("-")
    return tuple(names)


# ----------------------------------------------------------------------------- sites


def _site_rule(site: RouterSite, call: ProbeCall | None) -> None:
    """Infer the rule of an unregistered router (or check capture) from its probe call."""
    if site.family is not None and site.family.rule is not None:
        site.rule = R.with_scale(site.family.rule, site.module)
    if call is None:
        site.fired = False
        return
    out = _tensors(call.output)
    if site.family is None:
        site.output = _guess_output(out, site.top_k)
        if "experts" not in site.output:
            site.capture = "experts" if call.experts_in is not None else "none"
    logits = _pick(out, site.output, "logits")
    if logits is None:
        return
    logits_TE = logits.reshape(-1, logits.shape[-1])
    if site.family is None:
        site.num_experts = logits_TE.shape[-1]
        experts = _pick(out, site.output, "experts")
        weights = _pick(out, site.output, "weights")
        if experts is None:
            experts, weights = call.experts_in, call.weights_in
        if experts is not None and weights is not None:
            site.rule = R.infer_rule(site.module, logits_TE, weights, experts, own_bias(site))
            site.inferred = site.rule is not None


def _num_experts(site: RouterSite, call: ProbeCall | None, model: nn.Module) -> int:
    if call is not None:
        src = _tensors(call.output)
        t = _pick(src, site.output, "logits")
        t = _pick(src, site.output, "probs") if t is None else t
        t = _pick(src, site.output, "mask") if t is None else t
        if t is not None:
            return int(t.shape[-1]) - site.num_null
    weight = next((p for p in site.module.parameters() if p.dim() == 2), None)
    return int(weight.shape[0]) - site.num_null if weight is not None else 0


def find_routers(model: nn.Module) -> list[RouterSite]:
    """All MoE routers of ``model`` (see the module docstring); one probe forward.

    Raises :class:`NoMoERouterError` (one line) when there is none, e.g. for a dense Llama.
    """
    found = list(_blocks(model))
    if not found:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise NoMoERouterError(
            f"model type {kind!r} has no MoE router (no 'gate'/'router' module beside "
            f"'experts'); moelab.hf supports {SUPPORTED}"
        )
    with _perturbed_slots([_detect_slot(f[1], f[2]) and f for f in found]):
        calls = probe(model, [f[1] for f in found], [f[3] for f in found])
        return [_make_site(model, i, f, calls.get(i)) for i, f in enumerate(found)]


def _make_site(model: nn.Module, i: int, found: tuple, call: ProbeCall | None) -> RouterSite:
    """The site of one (path, router, block, experts) found, its rule from the registry or
    inferred from its probe call (the slots still perturbed)."""
    name, router, block, experts = found
    fam = lookup(type(router).__name__)
    match = _LAYER_RE.search(name)
    k = fam.top_k if fam and fam.top_k else _top_k(model, router)
    site = RouterSite(
        name, int(match.group(1)) if match else i, router, block, 0, k, None, fam,
        experts=experts,
    )  # fmt: skip
    if fam is not None:
        site.output, site.capture = fam.output, fam.capture
    else:
        site.extra["bias"] = _detect_slot(router, block)
    site.num_null = _null_count(fam, model)
    _site_rule(site, call)
    site.num_experts = _num_experts(site, call, model)
    return site


@contextmanager
def _perturbed_slots(found: list) -> Iterator[None]:
    """Unregistered routers' bias slots set to small random values for the probe (a zero slot
    cannot tell a rule that adds it from one that does not), restored after."""
    saved = []
    gen = torch.Generator().manual_seed(1)
    for entry in found:
        if not entry or lookup(type(entry[1]).__name__) is not None:
            continue
        owner, _, attr = _detect_slot(entry[1], entry[2]).partition(".")
        obj = entry[1] if owner == "router" else entry[2]
        for part in attr.split("."):
            obj = getattr(obj, part)
        saved.append((obj, obj.detach().clone()))
        with torch.no_grad():
            noise = torch.randn(obj.shape, generator=gen) * 0.05
            obj.add_(noise.to(obj))
    try:
        yield
    finally:
        with torch.no_grad():
            for obj, old in saved:
                obj.copy_(old)


def _detect_slot(router: nn.Module, block: nn.Module) -> str | None:
    """The first of :data:`BIAS_SLOTS` an unregistered router or its block has, or None."""
    for path in BIAS_SLOTS:
        owner, _, attr = path.partition(".")
        obj = router if owner == "router" else block
        for part in attr.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, Tensor) and obj.dim() >= 1:
            return path
    return None


def unsupported_reason(site: RouterSite) -> str | None:
    """Why moelab cannot re-select for this router (attach refuses), or None."""
    if site.rule is None:
        if site.family is not None:
            return f"its selection is not a rule of the logits ({site.family.note or 'fixed'})"
        return "no candidate rule reproduces its own output exactly on the probe batch"
    if not any(n in site.output for n in ("weights", "dense", "plan")):
        return "its output has no gate weights moelab can replace"
    return None


# ----------------------------------------------------------------------------- capture

OnRoute = Callable[[int, Tensor, Tensor], None]


@contextmanager
def capture_routing(sites: list[RouterSite], on_route: OnRoute) -> Iterator[None]:
    """Call ``on_route(site_index, scores_src_TC, experts_TK)`` (detached) on every router call.

    scores_src_TC: the recorded logits (probabilities where the family records those);
    experts_TK: the experts the model uses, null experts as indices E..C-1 (C for dropped).
    """
    handles = []
    pending: dict[int, Tensor] = {}
    for i, site in enumerate(sites):

        def on_router(m, args, output, i=i, site=site):
            logits_TC = recorded_scores(site, output).detach()
            experts_TK = experts_of(site, output, logits_TC)
            if experts_TK is None:
                pending[i] = logits_TC  # the experts module's input gives the experts
            else:
                on_route(i, logits_TC, experts_TK.detach())

        def on_experts(m, args, i=i):
            j = _int_arg(args)
            if i in pending and j is not None:
                on_route(i, pending.pop(i), args[j].reshape(-1, args[j].shape[-1]).detach())

        handles.append(site.module.register_forward_hook(on_router))
        if site.capture == "experts":
            handles.append(site.experts.register_forward_pre_hook(on_experts))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
