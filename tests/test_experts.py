"""Stacked SwiGLU experts: init options, shared experts, and the fast grouped path against the
plain autograd loop and a per-expert boolean-mask reference (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch

from moelab import dispatch
from moelab import experts as experts_mod
from moelab.experts import Experts, GroupedSwiGLU, SharedExperts, TokenSwiGLU, swiglu

E, D, F = 6, 10, 7


def experts(**kw) -> Experts:
    torch.manual_seed(0)
    return Experts(E, D, F, **kw)


def grads(out: torch.Tensor, g: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * g).sum(), tensors, retain_graph=True))


# ----------------------------------------------------------------------------- init


def test_diverse_init_spreads_the_per_expert_std():
    """init='diverse': expert stds rise evenly from 0.5x to 1.5x init_std; 'normal' keeps
    them equal (within sampling noise)."""
    torch.manual_seed(0)
    big = Experts(5, 64, 64, init_std=0.02, init="diverse")
    std_E = big.w13_ED2F.std(dim=(1, 2))
    torch.testing.assert_close(std_E, 0.02 * torch.linspace(0.5, 1.5, 5), rtol=0.05, atol=0)
    w2_std_E = big.w2_EFD.std(dim=(1, 2))
    torch.testing.assert_close(
        w2_std_E, 0.02 / 2**0.5 * torch.linspace(0.5, 1.5, 5), rtol=0.05, atol=0
    )
    same = Experts(5, 64, 64, init_std=0.02).w13_ED2F.detach().std(dim=(1, 2))
    assert float(same.max() / same.min()) < 1.1


# ----------------------------------------------------------------------------- shared experts


def test_shared_experts_equal_the_sum_of_separate_swiglu_experts():
    """SharedExperts(n) fuses n SwiGLU experts into one MLP of hidden n·F: its output is the
    sum of the n experts run separately on their slices of the weights."""
    torch.manual_seed(0)
    n = 3
    shared = SharedExperts(n, D, F)
    x = torch.randn(5, D)
    gate, up = shared.w13_D2F.chunk(2, dim=1)  # (D, n·F) each
    total = sum(
        swiglu(
            x,
            torch.cat([gate[:, i * F : (i + 1) * F], up[:, i * F : (i + 1) * F]], 1),
            shared.w2_FD[i * F : (i + 1) * F],
        )
        for i in range(n)
    )
    torch.testing.assert_close(shared(x), total)


# ----------------------------------------------------------------------------- fast path


@pytest.mark.parametrize("splits", [[3, 0, 5, 2, 1, 4], [0, 0, 7, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
def test_grouped_path_equals_the_split_loop(splits):
    """Experts.forward (one GroupedSwiGLU node) = the unbind/split autograd loop, outputs and
    gradients of x and both weight stacks, empty experts included (zero gradient)."""
    ex = experts()
    S = sum(splits)
    x = torch.randn(S, D, requires_grad=True)
    g = torch.randn(S, D)
    ws = (x, ex.w13_ED2F, ex.w2_EFD)
    fast = ex(x, splits)
    slow = ex.forward_split(x, splits)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(grads(fast, g, *ws), grads(slow, g, *ws), strict=True):
        torch.testing.assert_close(a, b)
    empty = [e for e, n in enumerate(splits) if n == 0]
    assert (grads(ex(x, splits), g, ex.w13_ED2F)[0][empty] == 0).all()


def test_grouped_swiglu_passes_gradcheck():
    """The hand-written backward of GroupedSwiGLU agrees with finite differences (float64)."""
    torch.manual_seed(0)
    splits = [2, 0, 3]
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: GroupedSwiGLU.apply(*a, splits), (x, w13, w2))


@pytest.mark.parametrize("capacity", [0, 3])
def test_dispatch_and_experts_equal_the_per_expert_reference(capacity):
    """permute -> Experts -> unpermute = Experts.forward_loop (boolean mask per expert), in
    outputs and in gradients of x, gate weights and weights; with drops, the reference sees
    only the kept slots."""
    ex = experts()
    T, K = 12, 2
    torch.manual_seed(1)
    x = torch.randn(T, D, requires_grad=True)
    w_TK = torch.rand(T, K, requires_grad=True)
    experts_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    p = dispatch.plan(experts_TK, w_TK, E, capacity=capacity)
    out = dispatch.unpermute(ex(dispatch.permute(x, p), p.splits), p, T)
    kept_w_TK = w_TK * p.kept_TK  # dropped slots carry weight 0 in the reference
    ref = ex.forward_loop(x, experts_TK, kept_w_TK)
    if capacity:
        assert int(p.dropped) > 0
    torch.testing.assert_close(out, ref)
    g = torch.randn(T, D)
    ws = (x, w_TK, ex.w13_ED2F, ex.w2_EFD)
    for a, b in zip(grads(out, g, *ws), grads(ref, g, *ws), strict=True):
        torch.testing.assert_close(a, b)


def test_expert_dropout_uses_the_autograd_loop_in_training_only():
    """With dropout > 0: training output is random (the split loop with dropout); eval output
    equals the dropout-free grouped path."""
    ex = experts(dropout=0.5)
    x = torch.randn(9, D)
    splits = [2, 1, 0, 3, 2, 1]
    ex.eval()
    clean = ex(x, splits)
    torch.testing.assert_close(clean, ex.forward_split(x, splits))
    ex.train()
    assert not torch.allclose(ex(x, splits), clean)


def test_bf16_experts_run_in_bf16():
    """bf16 weights and input: the grouped path returns bf16 close to the fp32 result."""
    ex = experts()
    x = torch.randn(8, D)
    splits = [2, 2, 0, 1, 2, 1]
    ref = ex(x, splits)
    out = ex.to(torch.bfloat16)(x.to(torch.bfloat16), splits)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)


def test_autocast_runs_experts_in_the_autocast_dtype():
    """Under bf16 autocast fp32 inputs and weights run in bf16, as x @ w would."""
    ex = experts()
    x = torch.randn(6, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ex(x, [1, 1, 1, 1, 1, 1])
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and ex.w13_ED2F.grad.dtype == torch.float32


@pytest.mark.parametrize("capacity", [0, 3])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
@pytest.mark.parametrize("pad_rows", [0, 64])
def test_fused_token_path_equals_permute_experts_unpermute(capacity, chunk, pad_rows, monkeypatch):
    """Experts.forward_tokens (one TokenSwiGLU node: gather, experts, weighted combine) equals
    unpermute(forward(permute(x))) in outputs and gradients of x, gate weights and weights,
    whether the slots run in one chunk or in chunks of one or a few experts, one matmul per
    expert or one bmm over experts padded to the chunk's largest (pad_rows 64)."""
    monkeypatch.setattr(experts_mod, "CHUNK_SLOTS", chunk)
    monkeypatch.setattr(experts_mod, "PAD_ROWS", pad_rows)
    monkeypatch.setattr(experts_mod, "PAD_MIN_THREADS", 1)
    ex = experts()
    T, K = 12, 2
    torch.manual_seed(2)
    x = torch.randn(T, D, requires_grad=True)
    w_TK = torch.rand(T, K, requires_grad=True)
    experts_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    p = dispatch.plan(experts_TK, w_TK, E, capacity=capacity)
    fused = ex.forward_tokens(x, p.token_S, p.weight_S, p.splits)
    steps = dispatch.unpermute(ex(dispatch.permute(x, p), p.splits), p, T)
    torch.testing.assert_close(fused, steps)
    g = torch.randn(T, D)
    ws = (x, w_TK, ex.w13_ED2F, ex.w2_EFD)
    for a, b in zip(grads(fused, g, *ws), grads(steps, g, *ws), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("pad_rows", [0, 64])
def test_token_swiglu_passes_gradcheck(pad_rows, monkeypatch):
    """TokenSwiGLU's hand-written backward agrees with finite differences (float64), with a
    token routed twice and a token not routed at all, on back-to-back slots and on experts
    padded to the largest (3 slots and 1 slot + 2 pad rows)."""
    monkeypatch.setattr(experts_mod, "PAD_ROWS", pad_rows)
    monkeypatch.setattr(experts_mod, "PAD_MIN_THREADS", 1)
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    token_S = torch.tensor([0, 2, 0, 1])
    weight_S = torch.rand(4, dtype=torch.float64, requires_grad=True)
    splits = [3, 1]

    def fn(x, w13, w2, weight_S):
        return TokenSwiGLU.apply(x, w13, w2, token_S, weight_S, splits)

    assert torch.autograd.gradcheck(fn, (x, w13, w2, weight_S))


def test_token_swiglu_mixes_padded_and_back_to_back_chunks(monkeypatch):
    """A layout with one back-to-back chunk then two padded ones (the second padded chunk's
    pad rows hold the first's stale pre-activations in backward) gives the same output and
    gradients as one matmul per expert, and saves only the S slots' pre-activations."""
    monkeypatch.setattr(experts_mod, "CHUNK_SLOTS", 4)
    monkeypatch.setattr(experts_mod, "PAD_MIN_THREADS", 1)
    splits = [1, 1, 1, 5, 2, 3, 1, 3]  # chunks: experts 0-3 (20 rows padded: too many), 4-5, 6-7
    chunks, _ = experts_mod._layout(splits, 4)
    assert [c.width for c in chunks] == [0, 3, 3]
    torch.manual_seed(0)
    S, T, Dm, Fh = sum(splits), 9, 3, 2
    x = torch.randn(T, Dm, dtype=torch.float64, requires_grad=True)
    w13 = torch.randn(len(splits), Dm, 2 * Fh, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(len(splits), Fh, Dm, dtype=torch.float64, requires_grad=True)
    weight_S = torch.rand(S, dtype=torch.float64, requires_grad=True)
    token_S = torch.randint(0, T, (S,))
    g = torch.randn(T, Dm, dtype=torch.float64)
    runs = []
    for pad_rows in (0, 64):
        monkeypatch.setattr(experts_mod, "PAD_ROWS", pad_rows)
        y = TokenSwiGLU.apply(x, w13, w2, token_S, weight_S, splits)
        assert y.grad_fn.saved_tensors[-1].shape == (S, 2 * Fh)  # unpadded pre-activation
        runs.append((y, *grads(y, g, x, w13, w2, weight_S)))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_one_cpu_thread_keeps_the_per_expert_loop():
    """Padding only pays when bmm can run experts side by side: one CPU thread never pads."""
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert not experts_mod._may_pad(torch.zeros(1))
        torch.set_num_threads(2)
        assert experts_mod._may_pad(torch.zeros(1))
    finally:
        torch.set_num_threads(n)
    chunks, first_E = experts_mod._layout([3, 2, 3, 2], 4, pad=False)
    assert first_E is None and all(c.width == 0 for c in chunks)
    assert [c.width for c in experts_mod._layout([3, 2, 3, 2], 4)[0]] == [3, 3]


# ----------------------------------------------------------------------------- grouped GEMM

GD, GF = 16, 32  # 16-byte aligned rows in fp32 and bf16: grouped GEMM can run


def _grouped_case(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Experts (E=6, D=16, F=32) and a routing of 12 tokens with one expert left empty."""
    torch.manual_seed(3)
    ex = Experts(E, GD, GF).to(device)
    T, K = 12, 2
    x = torch.randn(T, GD, device=device, requires_grad=True)
    w_TK = torch.rand(T, K, device=device, requires_grad=True)
    experts_TK = torch.stack([torch.randperm(E - 1)[:K] for _ in range(T)]).to(device)
    return ex, x, w_TK, experts_TK, dispatch.plan(experts_TK, w_TK, E)


def _grouped_vs_loop(ex, x, w_TK, experts_TK, p, dtype, monkeypatch):
    """(grouped outputs and grads of x, w, w13, w2), (the per-expert loop's, in fp32)."""
    g = torch.randn_like(x)
    ws = (x, w_TK, ex.w13_ED2F, ex.w2_EFD)
    monkeypatch.setattr(experts_mod, "GROUPED_MM", "on")
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        y = ex.forward_tokens(x, p.token_S, p.weight_S, p.kept_E)
    ref = ex.forward_loop(x, experts_TK, w_TK)
    return (y.float(), *grads(y.float(), g, *ws)), (ref, *grads(ref, g, *ws))


def test_grouped_mm_path_equals_the_per_expert_loop(monkeypatch):
    """With GROUPED_MM="on" (CPU: torch 2.13 runs grouped GEMM there, though not its autograd
    formula), forward_tokens runs GroupedMMSwiGLU and equals forward_loop in outputs and in
    the gradients of x, gate weights and both weight stacks, an empty expert included (its
    weight gradient is zero)."""
    ex, x, w_TK, experts_TK, p = _grouped_case()
    got, want = _grouped_vs_loop(ex, x, w_TK, experts_TK, p, torch.float32, monkeypatch)
    assert ex._grouped(x, torch.float32)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(got[3][E - 1].abs().sum() + got[4][E - 1].abs().sum()) == 0


def test_grouped_mm_forward_takes_split_lists_too(monkeypatch):
    """Experts.forward (the EP path's call, split sizes as a list) on grouped GEMM equals the
    per-expert GroupedSwiGLU."""
    ex, x, _, _, p = _grouped_case()
    x_SD = dispatch.permute(x, p)
    want = ex(x_SD, p.splits)
    monkeypatch.setattr(experts_mod, "GROUPED_MM", "on")
    torch.testing.assert_close(ex(x_SD, p.splits), want, rtol=1e-5, atol=1e-6)


def test_grouped_mm_runs_only_where_it_can(monkeypatch):
    """auto: CUDA only; off: never; on: where torch runs it for the dtype and 16-byte aligned
    rows (D=10 fp32 is not); never with expert dropout in training (the autograd loop)."""
    ex, x, *_ = _grouped_case()
    assert not ex._grouped(x, torch.float32)  # auto on the CPU
    monkeypatch.setattr(experts_mod, "GROUPED_MM", "on")
    assert ex._grouped(x, torch.float32)
    assert not experts()._grouped(torch.zeros(2, D), torch.float32)  # D=10: rows not aligned
    assert not experts_mod.grouped_mm_runs(torch.device("cpu"), torch.float64, 16, 32)
    dropping = Experts(E, GD, GF, dropout=0.1)
    assert not dropping._grouped(x, torch.float32)
    assert dropping.eval()._grouped(x, torch.float32)
    monkeypatch.setattr(experts_mod, "GROUPED_MM", "off")
    assert not ex._grouped(x, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_on_cuda_equals_the_per_expert_loop(dtype, monkeypatch):
    """On CUDA (GROUPED_MM="auto" takes grouped GEMM where it runs; bf16 must), outputs and
    gradients equal the fp32 per-expert loop: to 1e-4 in fp32, to 3e-2 in bf16."""
    ex, x, w_TK, experts_TK, p = _grouped_case("cuda")
    if dtype == torch.bfloat16:
        assert experts_mod.grouped_mm_runs(x.device, dtype, GD, GF)
    got, want = _grouped_vs_loop(ex, x, w_TK, experts_TK, p, dtype, monkeypatch)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_auto_takes_grouped_mm_for_cuda_tensors(monkeypatch):
    """GROUPED_MM="auto" chooses grouped GEMM for a tensor on CUDA when the probe says it runs
    there (a stand-in tensor and probe: the branch is checked without a GPU)."""
    from types import SimpleNamespace

    from moelab import grouped

    monkeypatch.setattr(grouped, "_probe", lambda device_type, dtype: device_type == "cuda")
    ex = Experts(E, GD, GF)
    assert ex._grouped(SimpleNamespace(device=torch.device("cuda", 0)), torch.bfloat16)
    assert not ex._grouped(torch.zeros(1), torch.float32)
