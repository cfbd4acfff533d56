"""Checks of moelab.hf on one model: what the tests and ``scripts/hf_coverage.py`` run per family.

Shape legend: T tokens, K top-k, E experts, B sequences, L sequence length.

- :func:`check_profile`: ``profile_model`` counts per layer equal the experts' own calls (read
  at the experts module's input, or where it gets none, from the router's dispatch output);
- :func:`check_identity`: attached with zero bias, the model's outputs are bit-identical;
- :func:`check_bias_routes`: a large bias on expert 0 makes every token of every layer use it;
- :func:`check_finetune`: 5 steps move the bias; the saved model (``save_pretrained`` +
  ``moelab_balance.pt``) reloads and routes every token as the tuned model does.

Each returns None when the check holds, else a one-line reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from moelab.config import BalanceConfig
from moelab.hf import outputs as ho
from moelab.hf import routers as hr
from moelab.hf.attach import attach
from moelab.hf.profile import profile_model

B, L = 2, 16


def tokens(model: nn.Module, seed: int = 1, batch: int = B) -> Tensor:
    """``(B, L)`` random token ids below the model's vocabulary size."""
    vocab = int(model.config.get_text_config().vocab_size)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, L), generator=gen)


def _dispatch_counts(site: hr.RouterSite, output: object) -> Tensor | None:
    """Counts ``(E,)`` from a router output that dispatches without indices (dense scores,
    JetMoE's expert sizes), or None."""
    out = output if isinstance(output, tuple) else (output,)
    if "dense" in site.output:
        dense = out[site.output.index("dense")]
        return (dense.reshape(-1, dense.shape[-1]) != 0).sum(0)[: site.num_experts]
    sizes = [t for t in out if isinstance(t, list)]
    return torch.tensor(sizes[0]) if sizes else None


def _input_counts(site: hr.RouterSite, args: tuple) -> Tensor | None:
    """Counts ``(E,)`` of the real slots an experts module was called with, or None."""
    j = hr._int_arg(args)
    if j is None:
        return None
    ids = args[j]
    if ids.dim() >= 2 and ids.shape[-1] == site.num_experts and site.top_k == 1:
        return ids.reshape(-1, site.num_experts).sum(0)  # a one-hot dispatch mask (Switch)
    ids_TK = ids.reshape(ids.shape[0] if ids.dim() > 1 else -1, -1)
    real_TK = ids_TK < site.num_experts
    weights = args[j + 1] if len(args) > j + 1 and isinstance(args[j + 1], Tensor) else None
    if site.num_null and weights is not None and weights.numel() == ids_TK.numel():
        real_TK &= weights.reshape(ids_TK.shape) != 0  # Zaya: the skip expert has weight 0
    ids_S = ids_TK[real_TK].flatten().cpu()
    return torch.zeros(site.num_experts, dtype=torch.long).scatter_add_(
        0, ids_S, torch.ones_like(ids_S)
    )


@contextmanager
def experts_calls(
    sites: list[hr.RouterSite], into: list[Tensor], tokens_seen: list[int] | None = None
) -> Iterator[None]:
    """Accumulate into ``into[i]`` the counts of the experts of site i as they are called (and
    into ``tokens_seen[i]`` the tokens its router saw)."""
    handles = []
    for i, site in enumerate(sites):

        def on_experts(m, args, i=i, site=site):
            got = _input_counts(site, args)
            if got is not None:
                into[i] += got.cpu().long()

        def on_router(m, args, output, i=i, site=site):
            if tokens_seen is not None:
                tokens_seen[i] += ho.recorded_scores(site, output).shape[0]
            got = _dispatch_counts(site, output)
            if got is not None:
                into[i] += got.cpu().long()

        handles.append(site.experts.register_forward_pre_hook(on_experts))
        handles.append(site.module.register_forward_hook(on_router))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, ids_BL: Tensor) -> object:
    return model(**hr.model_inputs(model, ids_BL))


def _output_tensor(out: object) -> Tensor:
    for name in ("logits", "last_hidden_state"):
        t = getattr(out, name, None)
        if isinstance(t, Tensor):
            return t
    return out[0]


@torch.no_grad()
def check_profile(model: nn.Module) -> str | None:
    """Profile counts per layer == the experts' own calls on the same tokens."""
    sites = hr.find_routers(model)
    calls = [torch.zeros(s.num_experts, dtype=torch.long) for s in sites]
    streams = {"a": tokens(model, 1, 3).flatten(), "b": tokens(model, 2, 1).flatten()}
    with experts_calls(sites, calls):
        result, _ = profile_model(model, streams, seq_len=L, batch_size=B, sites=sites)
    got = [lay["counts"] for lay in result["layers"]]
    want = [c.tolist() for c in calls]
    if got != want:
        bad = next(i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w)
        return f"layer {sites[bad].name}: profile {got[bad]} vs experts' calls {want[bad]}"
    return None


@torch.no_grad()
def check_identity(model: nn.Module) -> str | None:
    """Attached with zero bias, the model's output is bit-identical; detach restores it."""
    ids_BL = tokens(model)
    before = _output_tensor(_forward(model, ids_BL))
    handle = attach(model, BalanceConfig())
    after = _output_tensor(_forward(model, ids_BL))
    handle.detach()
    again = _output_tensor(_forward(model, ids_BL))
    if not torch.equal(before, after):
        return f"attached output differs by {float((before - after).abs().max()):.3g}"
    return None if torch.equal(before, again) else "output differs after detach"


@torch.no_grad()
def check_bias_routes(model: nn.Module, expert: int = 0, bias: float = 1e4) -> str | None:
    """A large bias on one expert: every token of every balanced layer is sent to it."""
    handle = attach(model, BalanceConfig())
    for b in handle.bias:
        b[expert] = bias
    calls = [torch.zeros(s.num_experts, dtype=torch.long) for s in handle.sites]
    seen = [0] * len(handle.sites)
    with experts_calls(handle.sites, calls, seen):
        _forward(model, tokens(model))
    handle.detach()
    for site, c, T in zip(handle.sites, calls, seen, strict=True):
        if int(c[expert]) != T:
            return f"{site.name}: expert {expert} got {int(c[expert])} of {T} tokens"
    return None


def _loss(model: nn.Module, ids_BL: Tensor) -> Tensor:
    """The LM loss where the model has a head, else the mean square of its last hidden state."""
    try:
        out = model(**hr.model_inputs(model, ids_BL), labels=ids_BL)
        if getattr(out, "loss", None) is not None:
            return out.loss
    except (TypeError, ValueError):
        pass
    return _output_tensor(_forward(model, ids_BL)).float().pow(2).mean()


def check_finetune(model: nn.Module, folder: str | Path, steps: int = 5) -> str | None:
    """5 AdamW steps with the loss-free bias and a global aux loss move the bias; the saved
    folder reloads (plain ``from_pretrained`` + attach from the folder) with the same biases
    and routes the same tokens to the same experts."""
    torch.manual_seed(0)
    cfg = BalanceConfig(bias_rate=0.05, aux_coef=1e-2, aux_scope="global")
    handle = attach(model.train(), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        (_loss(model, tokens(model, 10 + step)) + handle.aux_loss()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        handle.end_step()
    if all(float(b.abs().sum()) == 0 for b in handle.bias):
        return "the bias did not move in 5 steps"
    handle.detach()
    model.eval().save_pretrained(folder)
    handle.save(folder)
    loaded = type(model).from_pretrained(folder).eval()
    again = attach(loaded, from_folder=folder)
    if not all(torch.equal(a, b) for a, b in zip(handle.bias, again.bias, strict=True)):
        return "reloaded biases differ"
    return _same_routing(model, handle, loaded, again)


@torch.no_grad()
def _same_routing(model, handle, loaded, again) -> str | None:
    ids_BL = tokens(model, seed=99)
    mine = [torch.zeros(s.num_experts, dtype=torch.long) for s in handle.sites]
    theirs = [torch.zeros(s.num_experts, dtype=torch.long) for s in again.sites]
    reattached = attach(model, from_folder=None, balance=handle.cfg)
    for b, saved in zip(reattached.bias, handle.bias, strict=True):
        b.copy_(saved)
    reattached.rebase_slots()
    with experts_calls(reattached.sites, mine):
        _forward(model, ids_BL)
    with experts_calls(again.sites, theirs):
        _forward(loaded, ids_BL)
    reattached.detach()
    again.detach()
    if [m.tolist() for m in mine] != [t.tolist() for t in theirs]:
        return "the reloaded model routes differently from the tuned one"
    return None
