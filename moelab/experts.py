"""Stacked SwiGLU experts and shared experts.

Legend: T tokens, D model dim, F expert hidden, E experts, S kept token-slots (sorted by expert).

Each expert is SwiGLU (Shazeer 2020): y = (silu(x W1) ⊙ x W3) W2, with W1 and W3 fused into
one (D, 2F) matrix. Weights are stacked per expert; the forward pass runs one pair of matmuls
per expert on its contiguous segment of the permuted buffer (a loop over experts, never over
tokens). The stacks are ``unbind``-ed once per call and the buffer is ``split`` by counts:
indexing ``w[e]`` or ``x[a:b]`` inside the loop makes autograd build a full-size zero gradient
per expert, which costs seconds per step at E=64 on a CPU.

On CUDA the experts run as grouped GEMMs instead (``torch._grouped_mm`` / ``F.grouped_mm``:
one kernel per matmul for all experts, the segment ends given as a device tensor, so no host
read of the split sizes): :class:`moelab.grouped.GroupedMMSwiGLU`, where torch has it and it
runs for the dtype and shapes; else the path above. ``GROUPED_MM`` chooses: ``auto`` (CUDA
only), ``on`` (wherever it runs, e.g. the CPU in tests), ``off``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.grouped import GroupedMMSwiGLU, grouped_mm_runs, offsets, swiglu_act
from moelab.host import to_host

GROUPED_MM: Literal["auto", "on", "off"] = "auto"


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

    # Names of the stacked (E, ...) parameters: the only place outside this class that needs
    # them is the Hugging Face exporter's weight map (moelab.hf.export).
    STACKED: tuple[str, ...] = ("w13_ED2F", "w2_EFD")

    @property
    def params_per_expert(self) -> int:
        """Parameters of one expert: D·2F + F·D."""
        return sum(getattr(self, n)[0].numel() for n in self.STACKED)

    def keep_only(self, experts: slice) -> list[str]:
        """Keep only the experts in ``experts`` (expert parallelism: this rank's slice).

        Replaces each stacked parameter by a copy of its rows ``experts``; returns the
        parameter names (relative to this module) that now hold a slice of E experts.
        """
        for name in self.STACKED:
            setattr(self, name, nn.Parameter(getattr(self, name).data[experts].clone()))
        self.num_experts = self.w13_ED2F.shape[0]
        return list(self.STACKED)

    def grad_norm(self) -> Tensor:
        """(E,) L2 norm of each expert's weight gradient; zeros before any backward."""
        grads = [getattr(self, n).grad for n in self.STACKED]
        if any(g is None for g in grads):
            return torch.zeros(self.num_experts, device=self.w2_EFD.device)
        return sum(g.pow(2).flatten(1).sum(1) for g in grads).sqrt()

    def forward(self, x_SD: Tensor, splits: list[int]) -> Tensor:
        """Run expert e on rows [sum(splits[:e]), sum(splits[:e+1])): (S, D) -> (S, D).

        Without expert dropout this is one autograd node (:class:`GroupedSwiGLU`); with it,
        the plain autograd loop :meth:`forward_split`.
        """
        dtype = _compute_dtype(x_SD)
        w13, w2 = self.w13_ED2F.to(dtype), self.w2_EFD.to(dtype)
        if self._grouped(x_SD, dtype):
            return GroupedMMSwiGLU.apply(x_SD.to(dtype), w13, w2, offsets(splits, x_SD.device))
        splits = _host_splits(splits)
        if self.training and self.dropout > 0:
            return self.forward_split(x_SD.to(dtype), splits)
        return GroupedSwiGLU.apply(x_SD.to(dtype), w13, w2, splits)

    def _grouped(self, x: Tensor, dtype: torch.dtype) -> bool:
        """Whether this call runs as grouped GEMMs (:data:`GROUPED_MM`; never with expert
        dropout in training, which keeps the autograd loop)."""
        if GROUPED_MM == "off" or (GROUPED_MM == "auto" and x.device.type != "cuda"):
            return False
        if self.training and self.dropout > 0:
            return False
        return grouped_mm_runs(x.device, dtype, self.d_model, self.d_hidden)

    def forward_tokens(
        self, x_TD: Tensor, token_S: Tensor, weight_S: Tensor, splits: list[int] | Tensor
    ) -> Tensor:
        """Gather, run and combine in one step: y_t = Σ_s weight_s · expert_s(x_{token_s}).

        x_TD (T, D); token_S (S,) token of each slot, sorted by expert; weight_S (S,) gate
        weights; splits: slots per expert, a list or an (E,) tensor (read to the host only
        when the per-expert path runs). Returns (T, D). Grouped GEMMs where they run
        (:meth:`_grouped`): gather, :class:`GroupedMMSwiGLU`, weighted ``index_add``. Equals
        ``unpermute(forward(permute(x)))`` but, as one :class:`TokenSwiGLU` node, saves only the
        (S, 2F) pre-activation for backward instead of three (S, D) buffers.
        """
        dtype = _compute_dtype(x_TD)
        if self._grouped(x_TD, dtype):
            y_SD = self.forward(x_TD.to(dtype).index_select(0, token_S), splits)
            y_SD = y_SD * weight_S.to(dtype).unsqueeze(1)
            return y_SD.new_zeros(x_TD.shape[0], y_SD.shape[1]).index_add(0, token_S, y_SD)
        splits = _host_splits(splits)
        if self.training and self.dropout > 0:
            y_SD = self.forward_split(x_TD.to(dtype).index_select(0, token_S), splits)
            y_SD = y_SD * weight_S.to(dtype).unsqueeze(1)
            return y_SD.new_zeros(x_TD.shape[0], y_SD.shape[1]).index_add(0, token_S, y_SD)
        w13, w2 = self.w13_ED2F.to(dtype), self.w2_EFD.to(dtype)
        return TokenSwiGLU.apply(x_TD.to(dtype), w13, w2, token_S, weight_S, splits)

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


def _host_splits(splits: list[int] | Tensor) -> list[int]:
    """Split sizes as Python ints (one host read when given as a tensor)."""
    return to_host(splits, "expert segment sizes") if isinstance(splits, Tensor) else splits


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts run in: autocast's if it is on (as ``x @ w`` would), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _mm_split(a_SX: Tensor, w_views: tuple, sizes: list[int], out_SY: Tensor) -> Tensor:
    """out_e = a_e @ w_e for the row blocks a_e, out_e of ``split(sizes)``: one matmul per
    expert. ``split``/``unbind`` make all the views in one call each (no Python slicing per
    expert); an empty block costs one call and writes nothing."""
    for a, w, o in zip(a_SX.split(sizes), w_views, out_SY.split(sizes), strict=True):
        torch.mm(a, w, out=o)
    return out_SY


def _mm_split_t(a_SX: Tensor, b_SY: Tensor, sizes: list[int], out_views: tuple) -> None:
    """out_e = a_eᵀ @ b_e (a weight gradient per expert); an expert with no rows gets zeros
    (a matmul over an empty dimension), so the gradient stack needs no zero-fill."""
    for a, b, o in zip(a_SX.split(sizes), b_SY.split(sizes), out_views, strict=True):
        torch.mm(a.t(), b, out=o)


def _transposed_views(w_EAB: Tensor) -> tuple:
    """Per-expert views of w_e transposed, (B, A) each."""
    return w_EAB.transpose(1, 2).unbind(0)


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
        with torch.autocast(x_SD.device.type, enabled=False):
            x_SD = x_SD.contiguous()
            h13_S2F = x_SD.new_empty(S, w13_ED2F.shape[2])
            _mm_split(x_SD, w13_ED2F.unbind(0), splits, h13_S2F)
            y_SD = _mm_split(swiglu_act(h13_S2F), w2_EFD.unbind(0), splits, x_SD.new_empty(S, D))
        ctx.save_for_backward(x_SD, w13_ED2F, w2_EFD, h13_S2F)
        ctx.splits = splits
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD: Tensor):
        x_SD, w13_ED2F, w2_EFD, h13_S2F = ctx.saved_tensors
        sz = ctx.splits
        with torch.autocast(x_SD.device.type, enabled=False):
            dy_SD = dy_SD.contiguous()
            gate_SF, up_SF = h13_S2F.chunk(2, dim=-1)
            sig_SF = torch.sigmoid(gate_SF)
            silu_SF = gate_SF * sig_SF
            h_SF = silu_SF * up_SF
            dw2_EFD = torch.empty_like(w2_EFD)
            _mm_split_t(h_SF, dy_SD, sz, dw2_EFD.unbind(0))
            dh_SF = _mm_split(dy_SD, _transposed_views(w2_EFD), sz, torch.empty_like(h_SF))
            del h_SF
            dh13_S2F = torch.empty_like(h13_S2F)
            dgate_SF, dup_SF = dh13_S2F.chunk(2, dim=-1)
            torch.mul(dh_SF, silu_SF, out=dup_SF)
            # d silu(g)/dg = sig(g)·(1 + g·(1 − sig(g)))
            torch.mul(dh_SF * up_SF, sig_SF * (1 + gate_SF * (1 - sig_SF)), out=dgate_SF)
            del dh_SF, silu_SF, sig_SF
            dw13_ED2F = torch.empty_like(w13_ED2F)
            _mm_split_t(x_SD, dh13_S2F, sz, dw13_ED2F.unbind(0))
            dx_SD = _mm_split(dh13_S2F, _transposed_views(w13_ED2F), sz, torch.empty_like(x_SD))
        return dx_SD, dw13_ED2F, dw2_EFD, None


def _swiglu_grads(
    h13_N2F: Tensor, weight_N1: Tensor, dhw_NF: Tensor, hw_NF: Tensor, dh13_N2F: Tensor
) -> Tensor:
    """Backward of hw = weight·silu(gate)·up at the pre-activation h13 = [gate, up].

    dhw_NF: gradient with respect to hw (overwritten). Writes hw into ``hw_NF`` and the
    gradient with respect to h13 into ``dh13_N2F`` (preallocated buffers, reused across
    chunks); returns dweight_N = <dhw_n, h_n> (``vecdot``: one fused pass, unlike a
    (N, 1, F) @ (N, F, 1) ``bmm``). silu(gate) lives in dup's half until it becomes dup;
    ``silu_backward`` fuses silu's derivative.
    """
    gate_NF, up_NF = h13_N2F.chunk(2, dim=-1)
    dgate_NF, dup_NF = dh13_N2F.chunk(2, dim=-1)
    silu_NF = torch.ops.aten.silu.out(gate_NF, out=dup_NF)
    torch.mul(silu_NF, up_NF, out=hw_NF)  # h for now
    dweight_N = torch.linalg.vecdot(dhw_NF, hw_NF)
    hw_NF.mul_(weight_N1)
    dh_NF = dhw_NF.mul_(weight_N1)
    dup_NF.mul_(dh_NF)  # silu · dh
    torch.ops.aten.silu_backward.grad_input(dh_NF.mul_(up_NF), gate_NF, grad_input=dgate_NF)
    return dweight_N


# Token-slots per chunk in TokenSwiGLU (at most T, so that at small T the temporaries stay
# within the dense layer's T·k·F activations): bounds its temporary buffers.
CHUNK_SLOTS = 4096
# Mean token-slots per expert of a chunk at or below which TokenSwiGLU pads the chunk's experts
# to its largest and runs one ``bmm`` per matmul: a matmul of a few dozen rows keeps one BLAS
# call from using a second thread, while ``bmm`` runs experts side by side (measured 1.3-1.6x
# faster at 32 rows per expert on 2 threads, slower from about 128). 0 turns padding off.
PAD_ROWS = 64
PAD_WASTE = 2.0  # never pad a chunk to more than this many times its slots
# On one CPU thread bmm gains nothing and the pad rows are extra work (A at T=256: 1-thread
# CPU time 1.8x dense for bmm vs 1.4x for the loop), so CPU tensors pad from this many threads.
PAD_MIN_THREADS = 2


def _may_pad(x: Tensor) -> bool:
    """Whether TokenSwiGLU may pad for ``x``: off CPU, or on CPU with >= PAD_MIN_THREADS."""
    return x.device.type != "cpu" or torch.get_num_threads() >= PAD_MIN_THREADS


class _Chunk(NamedTuple):
    """Experts [e0, e1): slots [s0, s1) in buffer rows [r0, r1); ``width`` rows per expert when
    padded (each expert's slots first, then pad rows of weight 0), 0 when the slots lie back
    to back (then the rows are the slots, shifted)."""

    e0: int
    e1: int
    r0: int
    r1: int
    width: int
    s0: int
    s1: int


def _chunks(splits: list[int], min_rows: int) -> list[tuple[int, int, int, int]]:
    """Consecutive experts grouped into chunks that reach ``min_rows`` rows once padded to
    their largest expert (the last may have fewer; padded rows >= slots, so a chunk never
    holds more than min_rows + one expert's slots): (e0, e1, slot0, slot1) for experts
    [e0, e1); every expert is in exactly one chunk."""
    out, e0, r0, r, widest = [], 0, 0, 0, 0
    for e, n in enumerate(splits):
        r, widest = r + n, max(widest, n)
        if widest * (e + 1 - e0) >= min_rows:
            out.append((e0, e + 1, r0, r))
            e0, r0, widest = e + 1, r, 0
    if e0 < len(splits):
        out.append((e0, len(splits), r0, r))
    return out


def _layout(
    splits: list[int], min_rows: int, pad: bool = True
) -> tuple[list[_Chunk], list[int] | None]:
    """Chunks of whole experts and where their slots go in the buffer: rows [r0, r1) per chunk,
    padded to ``width`` rows per expert where the mean is <= ``PAD_ROWS`` slots per expert
    (and padding costs at most ``PAD_WASTE`` times the slots; never if not ``pad``). Returns
    the chunks and each expert's first buffer row (None when nothing is padded: the buffer is
    the slot order)."""
    out, first_E, r0 = [], [], 0
    for e0, e1, a, b in _chunks(splits, min_rows):
        sz, n = splits[e0:e1], b - a
        width = max(sz)
        padded = pad and 0 < n <= PAD_ROWS * len(sz) and width * len(sz) <= PAD_WASTE * n
        width = width if padded else 0
        rows = [width] * len(sz) if padded else sz
        first_E += [r0 + sum(rows[:i]) for i in range(len(sz))]
        out.append(_Chunk(e0, e1, r0, r0 + sum(rows), width, a, b))
        r0 += sum(rows)
    return out, (first_E if any(c.width for c in out) else None)


def _pad_slots(token_S, weight_S, splits, first_E, rows: int):
    """Token, weight (0 on pad rows) and slot of every buffer row: (R,) each, and row_S (S,)."""
    counts_E = torch.tensor(splits, device=token_S.device)
    start_E = torch.cumsum(counts_E, 0) - counts_E
    expert_S = torch.repeat_interleave(torch.arange(len(splits), device=token_S.device), counts_E)
    first = torch.tensor(first_E, device=token_S.device)
    row_S = first[expert_S] + torch.arange(token_S.shape[0], device=token_S.device)
    row_S -= start_E[expert_S]
    token_R = token_S.new_zeros(rows).index_copy_(0, row_S, token_S)
    weight_R = weight_S.new_zeros(rows).index_copy_(0, row_S, weight_S)
    return token_R, weight_R, row_S


def _mm(a_RX: Tensor, w_EXY: Tensor, c: _Chunk, sizes: list[int], out_RY: Tensor) -> Tensor:
    """out = a_e @ w_e for each expert of chunk c: one ``bmm`` over the padded (e, width, ·)
    view, else one matmul per expert on its rows."""
    if c.width:
        a, o = a_RX.view(-1, c.width, a_RX.shape[1]), out_RY.view(-1, c.width, out_RY.shape[1])
        torch.bmm(a, w_EXY[c.e0 : c.e1], out=o)
        return out_RY
    return _mm_split(a_RX, w_EXY[c.e0 : c.e1].unbind(0), sizes, out_RY)


def _mm_t(a_RX: Tensor, b_RY: Tensor, c: _Chunk, sizes: list[int], out_EXY: Tensor) -> None:
    """out_e = a_eᵀ @ b_e (a weight gradient per expert of chunk c); pad rows are zero in b."""
    if c.width:
        a, b = a_RX.view(-1, c.width, a_RX.shape[1]), b_RY.view(-1, c.width, b_RY.shape[1])
        torch.bmm(a.transpose(1, 2), b, out=out_EXY[c.e0 : c.e1])
    else:
        _mm_split_t(a_RX, b_RY, sizes, out_EXY[c.e0 : c.e1].unbind(0))


class TokenSwiGLU(torch.autograd.Function):
    """Gather -> SwiGLU experts on contiguous segments -> gate-weighted sum per token, as one
    autograd node: x (T, D) -> y (T, D), y_t = Σ_{s: token_s = t} w_s · expert_s(x_t).

    The gate weight is folded into the hidden activation (w·(h W2) = (w·h) W2), so its
    gradient is <dL/d(w·h), h> on (S, F) rather than on (S, D). Only the (S, 2F)
    pre-activation is saved (x is the caller's). Work runs in chunks of about
    C = min(``CHUNK_SLOTS``, T) slots (whole experts), so the gathered inputs, outputs and
    gradients are never materialised for all S = T·k slots: temporary memory is
    O(C·(D + 2F)), not O(S·D). Per chunk, one matmul per expert, or at few slots per expert
    one ``bmm`` over experts padded to the chunk's largest (R rows in all, R <= 2S; a pad row
    has gate weight 0, so it adds nothing to y and its gradients are zero); elementwise work
    once per chunk. The pre-activation is saved unpadded, (S, 2F): padding lives only in the
    per-chunk buffers, which are allocated once per call and reused (``out=``).
    """

    @staticmethod
    def forward(ctx, x_TD, w13_ED2F, w2_EFD, token_S, weight_S, splits):
        T, D = x_TD.shape
        chunks, first_E = _layout(splits, min(CHUNK_SLOTS, T), _may_pad(x_TD))
        w_S = weight_S.detach().to(x_TD.dtype)
        token_R, w_R, row_S = token_S, w_S, None
        if first_E is not None:
            token_R, w_R, row_S = _pad_slots(token_S, w_S, splits, first_E, chunks[-1].r1)
        h13_S2F = x_TD.new_empty(token_S.shape[0], w13_ED2F.shape[2])
        y_TD = x_TD.new_zeros(T, D)
        w_R1 = w_R.unsqueeze(1)
        n_max = max(c.r1 - c.r0 for c in chunks)
        xbuf, hbuf = x_TD.new_empty(n_max, D), x_TD.new_empty(n_max, w2_EFD.shape[1])
        h13buf = x_TD.new_empty(n_max if row_S is not None else 0, w13_ED2F.shape[2])
        with torch.autocast(x_TD.device.type, enabled=False):
            for c in chunks:
                n, sz, A, B = c.r1 - c.r0, splits[c.e0 : c.e1], c.r0, c.r1
                x_ND = torch.index_select(x_TD, 0, token_R[A:B], out=xbuf[:n])
                h13_s = h13_S2F[c.s0 : c.s1]
                h13_N2F = _mm(x_ND, w13_ED2F, c, sz, h13buf[:n] if c.width else h13_s)
                if c.width:  # keep the slots' rows only
                    torch.index_select(h13_N2F, 0, row_S[c.s0 : c.s1] - A, out=h13_s)
                gate_NF, up_NF = h13_N2F.chunk(2, dim=-1)
                hw_NF = torch.ops.aten.silu.out(gate_NF, out=hbuf[:n])
                hw_NF.mul_(up_NF).mul_(w_R1[A:B])
                y_ND = _mm(hw_NF, w2_EFD, c, sz, x_ND)
                y_TD.index_add_(0, token_R[A:B], y_ND)
        ctx.save_for_backward(x_TD, w13_ED2F, w2_EFD, token_R, w_R, row_S, h13_S2F)
        ctx.chunks, ctx.splits, ctx.weight_dtype = chunks, splits, weight_S.dtype
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, w13_ED2F, w2_EFD, token_R, w_R, row_S, h13_S2F = ctx.saved_tensors
        chunks, splits = ctx.chunks, ctx.splits
        dy_TD = dy_TD.to(x_TD.dtype).contiguous()
        w_R1 = w_R.unsqueeze(1)
        dw13_ED2F, dw2_EFD = torch.empty_like(w13_ED2F), torch.empty_like(w2_EFD)
        w13T_E2FD, w2T_EDF = w13_ED2F.transpose(1, 2), w2_EFD.transpose(1, 2)
        dweight_R = w_R.new_empty(token_R.shape[0])
        dx_TD = torch.zeros_like(x_TD)
        D, F_ = x_TD.shape[1], w2_EFD.shape[1]
        n_max = max(c.r1 - c.r0 for c in chunks)
        dybuf, xbuf = x_TD.new_empty(n_max, D), x_TD.new_empty(n_max, D)
        dhwbuf, hwbuf = x_TD.new_empty(n_max, F_), x_TD.new_empty(n_max, F_)
        dh13buf = x_TD.new_empty(n_max, 2 * F_)
        # pad rows need finite values only (their weight is 0): zeros, then earlier chunks' rows
        h13buf = x_TD.new_zeros(n_max if row_S is not None else 0, 2 * F_)
        with torch.autocast(x_TD.device.type, enabled=False):
            for c in chunks:
                n, sz, A, B = c.r1 - c.r0, splits[c.e0 : c.e1], c.r0, c.r1
                idx = token_R[A:B]
                dy_ND = torch.index_select(dy_TD, 0, idx, out=dybuf[:n])
                dhw_NF = _mm(dy_ND, w2T_EDF, c, sz, dhwbuf[:n])
                hw_NF, dh13_N2F = hwbuf[:n], dh13buf[:n]
                h13_N2F = h13_S2F[c.s0 : c.s1]
                if c.width:
                    h13_N2F = h13buf[:n].index_copy_(0, row_S[c.s0 : c.s1] - A, h13_N2F)
                dweight_R[A:B] = _swiglu_grads(h13_N2F, w_R1[A:B], dhw_NF, hw_NF, dh13_N2F)
                x_ND = torch.index_select(x_TD, 0, idx, out=xbuf[:n])
                _mm_t(hw_NF, dy_ND, c, sz, dw2_EFD)
                _mm_t(x_ND, dh13_N2F, c, sz, dw13_ED2F)
                _mm(dh13_N2F, w13T_E2FD, c, sz, dy_ND)  # now dx
                dx_TD.index_add_(0, idx, dy_ND)
        dweight_S = dweight_R if row_S is None else dweight_R[row_S]
        return dx_TD, dw13_ED2F, dw2_EFD, None, dweight_S.to(ctx.weight_dtype), None


class SharedExperts(nn.Module):
    """``n`` always-on SwiGLU experts, fused into one MLP of hidden size n·F (same function)."""

    def __init__(self, n: int, d_model: int, d_hidden: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.w13_D2F = nn.Parameter(torch.randn(d_model, 2 * n * d_hidden) * init_std)
        self.w2_FD = nn.Parameter(torch.randn(n * d_hidden, d_model) * init_std / math.sqrt(2))

    def forward(self, x_TD: Tensor) -> Tensor:
        """(T, D) -> (T, D)."""
        return swiglu(x_TD, self.w13_D2F.to(x_TD.dtype), self.w2_FD.to(x_TD.dtype))
