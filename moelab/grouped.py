"""Grouped GEMM experts: SwiGLU on contiguous row segments, one grouped matmul per product.

Legend: S token-slots sorted by expert, D model dim, F expert hidden, E experts.

``torch._grouped_mm`` (``F.grouped_mm`` in newer torch) multiplies each expert's segment of an
(S, ·) buffer by that expert's weight in one kernel, the segment ends given as an (E,) int32
device tensor: no per-expert launch and no host read of the split sizes. ``moelab.experts``
uses it on CUDA where :func:`grouped_mm_runs` says it runs (``GROUPED_MM`` there), with the
per-expert matmuls as the fallback.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def offsets(splits: list[int] | Tensor, device: torch.device) -> Tensor:
    """(E,) int32 end row of each expert's segment, on ``device`` (grouped GEMM's ``offs``)."""
    counts_E = splits if isinstance(splits, Tensor) else torch.tensor(splits, device=device)
    return torch.cumsum(counts_E.to(device), 0).to(torch.int32)


def _grouped_mm_op():
    """torch's grouped GEMM: ``F.grouped_mm`` where it exists, else ``torch._grouped_mm``,
    else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_runs(device: torch.device, dtype: torch.dtype, d_model: int, d_hidden: int) -> bool:
    """Whether grouped GEMM runs here for experts of these sizes: torch has it, rows are
    16-byte aligned (its kernels' rule), and a small probe of the three forms used (forward,
    input gradient, weight gradient) runs on this device type and dtype."""
    size = torch.empty((), dtype=dtype).element_size()
    if _grouped_mm_op() is None or any(n * size % 16 for n in (d_model, d_hidden)):
        return False
    return _probe(device.type, dtype)


@functools.cache
def _probe(device_type: str, dtype: torch.dtype) -> bool:
    """One small call of each form, with segment ends that are not multiples of anything and
    an empty expert (as real routings have)."""
    op, dev = _grouped_mm_op(), torch.device(device_type)
    try:
        x_SD = torch.ones(37, 16, device=dev, dtype=dtype)
        w_EDF = torch.ones(3, 16, 16, device=dev, dtype=dtype)
        offs = torch.tensor([5, 5, 37], device=dev, dtype=torch.int32)
        with torch.autocast(device_type, enabled=False):
            op(x_SD, w_EDF, offs=offs)
            op(x_SD, w_EDF.transpose(1, 2), offs=offs)
            op(x_SD.t(), x_SD, offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    return True


class GroupedMMSwiGLU(torch.autograd.Function):
    """SwiGLU experts on contiguous row segments as grouped GEMMs: (S, D) -> (S, D).

    offs_E (E,) int32: the end row of each expert's segment (an empty expert repeats the
    previous end). Forward, input and weight gradients are each one grouped GEMM per matmul
    (the weight gradient in the 2-D x 2-D form, one (·, ·) block per expert, zeros for an
    empty one); torch's own autograd formula is not used because it does not run on the CPU,
    where this path is tested against the per-expert loop. Saved: x (S, D) and the fused
    pre-activation (S, 2F), as in :class:`GroupedSwiGLU`.
    """

    @staticmethod
    def forward(ctx, x_SD: Tensor, w13_ED2F: Tensor, w2_EFD: Tensor, offs_E: Tensor) -> Tensor:
        gmm = _grouped_mm_op()
        with torch.autocast(x_SD.device.type, enabled=False):
            x_SD = x_SD.contiguous()
            h13_S2F = gmm(x_SD, w13_ED2F, offs=offs_E)
            y_SD = gmm(swiglu_act(h13_S2F), w2_EFD, offs=offs_E)
        ctx.save_for_backward(x_SD, w13_ED2F, w2_EFD, h13_S2F, offs_E)
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD: Tensor):
        x_SD, w13_ED2F, w2_EFD, h13_S2F, offs_E = ctx.saved_tensors
        gmm = _grouped_mm_op()
        with torch.autocast(x_SD.device.type, enabled=False):
            dy_SD = dy_SD.to(x_SD.dtype).contiguous()
            gate_SF, up_SF = h13_S2F.chunk(2, dim=-1)
            sig_SF = torch.sigmoid(gate_SF)
            silu_SF = gate_SF * sig_SF
            dw2_EFD = gmm((silu_SF * up_SF).t(), dy_SD, offs=offs_E)
            dh_SF = gmm(dy_SD, w2_EFD.transpose(1, 2), offs=offs_E)
            # d silu(g)/dg = sig(g)·(1 + g·(1 − sig(g)))
            dgate_SF = dh_SF * up_SF * (sig_SF * (1 + gate_SF * (1 - sig_SF)))
            dh13_S2F = torch.cat([dgate_SF, dh_SF * silu_SF], dim=-1)
            dw13_ED2F = gmm(x_SD.t(), dh13_S2F, offs=offs_E)
            dx_SD = gmm(dh13_S2F, w13_ED2F.transpose(1, 2), offs=offs_E)
        return dx_SD, dw13_ED2F, dw2_EFD, None


def swiglu_act(h13_N2F: Tensor) -> Tensor:
    """silu(gate)·up of a fused (N, 2F) pre-activation -> (N, F)."""
    gate_NF, up_NF = h13_N2F.chunk(2, dim=-1)
    return F.silu(gate_NF) * up_NF
