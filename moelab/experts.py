"""Stacked SwiGLU experts and shared experts.

Legend: T tokens, D model dim, F expert hidden, E experts, S kept token-slots (sorted by expert).

Each expert is SwiGLU (Shazeer 2020): y = (silu(x W1) ⊙ x W3) W2, with W1 and W3 fused into
one (D, 2F) matrix. Weights are stacked per expert; the forward pass runs one pair of matmuls
per expert on its contiguous segment of the permuted buffer (a loop over experts, never over
tokens). The stacks are ``unbind``-ed once per call and the buffer is ``split`` by counts:
indexing ``w[e]`` or ``x[a:b]`` inside the loop makes autograd build a full-size zero gradient
per expert, which costs seconds per step at E=64 on a CPU.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def swiglu(x_ND: Tensor, w13_D2F: Tensor, w2_FD: Tensor, dropout: float = 0.0) -> Tensor:
    """SwiGLU MLP on rows, optional dropout on the hidden activation: (N, D) -> (N, D)."""
    gate_NF, up_NF = (x_ND @ w13_D2F).chunk(2, dim=-1)
    h_NF = F.silu(gate_NF) * up_NF
    if dropout:
        h_NF = F.dropout(h_NF, dropout)
    return h_NF @ w2_FD


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights ``w13_ED2F`` (E, D, 2F) and ``w2_EFD`` (E, F, D).

    init: ``normal`` draws every expert with std ``init_std``; ``diverse`` scales expert e's
    std by a factor spread evenly over [0.5, 1.5] so that experts start different
    (seed 001, "expert-specific init").
    dropout: dropout on the hidden activation inside each expert (Switch "expert dropout").
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        *,
        init_std: float = 0.02,
        init: str = "normal",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.w13_ED2F = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_hidden))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.init_std, self.init, self.dropout = init_std, init, dropout
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal init; output projections scaled by 1/sqrt(2) like GPT-2 residual branches."""
        E = self.num_experts
        scale_E = torch.ones(E)
        if self.init == "diverse":
            scale_E = torch.linspace(0.5, 1.5, E) if E > 1 else scale_E
        with torch.no_grad():
            for w, std in (
                (self.w13_ED2F, self.init_std),
                (self.w2_EFD, self.init_std / math.sqrt(2)),
            ):
                w.normal_(0.0, 1.0).mul_(std * scale_E.view(E, 1, 1))

    def forward(self, x_SD: Tensor, splits: list[int]) -> Tensor:
        """Run expert e on rows [sum(splits[:e]), sum(splits[:e+1])): (S, D) -> (S, D).

        Without expert dropout this is one autograd node (:class:`GroupedSwiGLU`); with it,
        the plain autograd loop :meth:`forward_split`.
        """
        dtype = _compute_dtype(x_SD)
        w13, w2 = self.w13_ED2F.to(dtype), self.w2_EFD.to(dtype)
        if self.training and self.dropout > 0:
            return self.forward_split(x_SD.to(dtype), splits)
        return GroupedSwiGLU.apply(x_SD.to(dtype), w13, w2, splits)

    def forward_split(self, x_SD: Tensor, splits: list[int]) -> Tensor:
        """Same as :meth:`forward` through plain autograd: ``unbind`` the stacks once, ``split``
        the buffer by counts, one SwiGLU per expert, ``cat`` (used with expert dropout)."""
        w13s, w2s = self.w13_ED2F.unbind(0), self.w2_EFD.unbind(0)
        p = self.dropout if self.training else 0.0
        outs = []
        for x_ND, w13, w2 in zip(x_SD.split(splits), w13s, w2s, strict=True):
            if x_ND.shape[0] == 0:
                continue
            outs.append(swiglu(x_ND, w13.to(x_ND.dtype), w2.to(x_ND.dtype), p))
        if not outs:
            return x_SD.new_zeros(0, self.d_model)
        return torch.cat(outs, 0)

    def forward_loop(self, x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """Naive reference: for each expert, its tokens by boolean mask (tests only)."""
        out_TD = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            tok, slot = (experts_TK == e).nonzero(as_tuple=True)
            if tok.numel():
                y = swiglu(x_TD[tok], self.w13_ED2F[e], self.w2_EFD[e])
                out_TD = out_TD.index_add(0, tok, y * weights_TK[tok, slot].unsqueeze(1))
        return out_TD


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts run in: autocast's if it is on (as ``x @ w`` would), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _segments(splits: list[int]) -> list[tuple[int, int, int]]:
    """(e, start, end) for every non-empty segment of a buffer split by ``splits``."""
    ends = list(itertools.accumulate(splits))
    return [(e, end - n, end) for e, (n, end) in enumerate(zip(splits, ends, strict=True)) if n]


def _empty_grad(w_EAB: Tensor, segments: list[tuple[int, int, int]]) -> Tensor:
    """Uninitialised gradient for a weight stack; experts without tokens get zeros."""
    g_EAB = torch.empty_like(w_EAB)
    hit = {e for e, _, _ in segments}
    for e in range(w_EAB.shape[0]):
        if e not in hit:
            g_EAB[e].zero_()
    return g_EAB


class GroupedSwiGLU(torch.autograd.Function):
    """SwiGLU experts on contiguous row segments as one autograd node: (S, D) -> (S, D).

    Forward and backward write each expert's matmul straight into preallocated (S, ·) buffers
    (``torch.mm(..., out=...)``) and run the activation once over the whole buffer, so there
    is no per-expert autograd graph, no ``cat`` of outputs or gradients and no full-size zero
    gradient per expert. Saved for backward: x (S, D) and the fused pre-activation (S, 2F);
    silu(gate)·up is recomputed (cheaper than storing it).
    """

    @staticmethod
    def forward(ctx, x_SD: Tensor, w13_ED2F: Tensor, w2_EFD: Tensor, splits: list[int]) -> Tensor:
        S, D = x_SD.shape
        F2 = w13_ED2F.shape[2]
        with torch.autocast(x_SD.device.type, enabled=False):
            x_SD = x_SD.contiguous()
            h13_S2F = x_SD.new_empty(S, F2)
            segments = _segments(splits)
            for e, a, b in segments:
                torch.mm(x_SD[a:b], w13_ED2F[e], out=h13_S2F[a:b])
            h_SF = _swiglu_act(h13_S2F)
            y_SD = x_SD.new_empty(S, D)
            for e, a, b in segments:
                torch.mm(h_SF[a:b], w2_EFD[e], out=y_SD[a:b])
        ctx.save_for_backward(x_SD, w13_ED2F, w2_EFD, h13_S2F)
        ctx.segments = segments
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD: Tensor):
        x_SD, w13_ED2F, w2_EFD, h13_S2F = ctx.saved_tensors
        segments = ctx.segments
        with torch.autocast(x_SD.device.type, enabled=False):
            dy_SD = dy_SD.contiguous()
            gate_SF, up_SF = h13_S2F.chunk(2, dim=-1)
            sig_SF = torch.sigmoid(gate_SF)
            silu_SF = gate_SF * sig_SF
            h_SF = silu_SF * up_SF
            dw2_EFD = _empty_grad(w2_EFD, segments)
            dh_SF = torch.empty_like(h_SF)
            for e, a, b in segments:
                torch.mm(h_SF[a:b].t(), dy_SD[a:b], out=dw2_EFD[e])
                torch.mm(dy_SD[a:b], w2_EFD[e].t(), out=dh_SF[a:b])
            del h_SF
            dh13_S2F = torch.empty_like(h13_S2F)
            dgate_SF, dup_SF = dh13_S2F.chunk(2, dim=-1)
            torch.mul(dh_SF, silu_SF, out=dup_SF)
            # d silu(g)/dg = sig(g)·(1 + g·(1 − sig(g)))
            torch.mul(dh_SF * up_SF, sig_SF * (1 + gate_SF * (1 - sig_SF)), out=dgate_SF)
            del dh_SF, silu_SF, sig_SF
            dw13_ED2F = _empty_grad(w13_ED2F, segments)
            dx_SD = torch.empty_like(x_SD)
            for e, a, b in segments:
                torch.mm(x_SD[a:b].t(), dh13_S2F[a:b], out=dw13_ED2F[e])
                torch.mm(dh13_S2F[a:b], w13_ED2F[e].t(), out=dx_SD[a:b])
        return dx_SD, dw13_ED2F, dw2_EFD, None


def _swiglu_act(h13_N2F: Tensor) -> Tensor:
    """silu(gate)·up of a fused (N, 2F) pre-activation -> (N, F)."""
    gate_NF, up_NF = h13_N2F.chunk(2, dim=-1)
    return F.silu(gate_NF) * up_NF


class SharedExperts(nn.Module):
    """``n`` always-on SwiGLU experts, fused into one MLP of hidden size n·F (same function)."""

    def __init__(self, n: int, d_model: int, d_hidden: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.w13_D2F = nn.Parameter(torch.randn(d_model, 2 * n * d_hidden) * init_std)
        self.w2_FD = nn.Parameter(torch.randn(n * d_hidden, d_model) * init_std / math.sqrt(2))

    def forward(self, x_TD: Tensor) -> Tensor:
        """(T, D) -> (T, D)."""
        return swiglu(x_TD, self.w13_D2F.to(x_TD.dtype), self.w2_FD.to(x_TD.dtype))
