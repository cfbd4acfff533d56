"""Forward+backward speed and peak memory of ``moelab.MoELayer`` against its floors.

Compares, on the CPU in fp32 with ``torch.set_num_threads(2)``:
  * ``moelab``  MoELayer (dropless softmax top-k SwiGLU, the default config);
  * ``dense``   a SwiGLU FFN with the same *active* FLOPs (hidden size k·f): the practical floor;
  * ``loop``    the "careful per-expert loop" the issue measures against: moelab's router and
    plan, ``index_select`` gather, the weight stacks ``unbind``-ed once and the gathered rows
    ``split`` by counts, one plain-autograd SwiGLU per expert, ``cat``, weighted ``index_add``
    (``Experts.forward_split``); its output is checked against moelab's first;
  * ``hf_<impl>``  transformers' ``Qwen3MoeSparseMoeBlock`` with the same weights copied in, for
    each expert implementation transformers registers (``eager`` and the ``ExpertsInterface``
    entries, e.g. ``grouped_mm``, ``batched_mm``); outputs are checked against moelab's first.
moelab's time is broken down into router (gate + routing), dispatch (plan + permute + unpermute)
and experts (the SwiGLU segments), each timed alone with its own forward and backward.

Timing: each round runs every candidate once, in turn, after warm-up; the JSON holds the median
time per candidate and the median of the per-round ratios to ``dense`` (robust when the machine
is shared: a busy spell slows every candidate of that round alike).

Memory: for every (config, candidate) a fresh subprocess resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) after a warm-up step, runs one forward+backward and reports
VmHWM − VmRSS before: the extra resident memory of one training step (glibc's mmap threshold
is fixed at 64 KiB so that freed buffers leave the resident set). The weight gradients are
subtracted (an MoE has E/k times the dense layer's parameters, so its gradients are larger
whatever the tokens): the goal is on the *activation* peak, the part that grows with T. Also
the activation bytes autograd saves for backward (parameters excluded).

Matmul floor: ``mm_experts`` runs only the six per-expert matmuls of a forward+backward (the
routed counts, preallocated buffers), ``bmm_experts`` the same six as ``bmm`` over experts padded
to the largest count (what moelab runs at few slots per expert), and ``mm_dense`` the dense
layer's six; no MoE layer built from these kernels on this BLAS beats the faster of the two.

Allocator: ``main`` sets ``THP_MEM_ALLOC_ENABLE=1`` (unless set), as the ``moelab`` command
does: torch backs buffers of 2 MiB and more with huge pages, which cuts the page faults of the
fresh weight gradients of every step (moelab and dense alike; ``machine.thp`` records it). The
memory children run without it.

Usage: ``python benchmarks/moe_layer.py [--configs A B A_T256 A_T16384] [--rounds 5]
[--malloc keep] [--out PATH]`` writes ``benchmarks/results/moe_layer.json``.

On a device: ``--device cuda [--dtypes fp32 bf16] [--configs A B A_T256]`` times moelab, the
dense floor, the per-expert loop and transformers' implementations there (each dtype through
autocast, the router in fp32), per-candidate peak device memory of one step, and which expert
kernel moelab ran (``grouped_mm`` or the per-expert path); outputs are checked against moelab's
at fp32. ``--device cpu --configs toy`` runs the same code at a toy shape (the dry run of
``scripts/device_check.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moelab  # noqa: E402
from moelab import dispatch  # noqa: E402
from moelab import experts as experts_mod  # noqa: E402
from moelab.cli import enable_huge_pages  # noqa: E402
from moelab.experts import swiglu  # noqa: E402

CONFIGS = {  # name: (T tokens, d model, E experts, k top-k, f expert hidden)
    "A": (4096, 512, 64, 8, 256),
    "B": (4096, 512, 8, 2, 1024),
    "A_T256": (256, 512, 64, 8, 256),
    "A_T16384": (16384, 512, 64, 8, 256),
}
CPU_CONFIGS = list(CONFIGS)  # the CPU benchmark's default set
CONFIGS["toy"] = (64, 32, 4, 2, 32)  # the device path's dry run on a CPU
DEVICE_CONFIGS = ["A", "B", "A_T256"]
DEVICE_GOALS = {"A": 1.3}  # bf16 on a GPU: moelab / dense (issue 17)
GOALS = {"A": 1.2, "B": 1.0, "A_T256": 2.5}  # moelab / dense
HF_SPEEDUP_GOAL = 1.5  # fastest transformers implementation / moelab, at A
MEMORY_GOAL = 1.8  # moelab / dense peak activation memory
BATCHED_MM_LIMIT = 4 * 2**30  # batched_mm copies a (D, 2F) weight per token-slot
THREADS = 2
# glibc: a fixed mmap threshold makes every buffer over 64 KiB its own mapping, returned on
# free, so resident memory follows live tensors (the default threshold adapts upwards and
# keeps freed buffers in the heap, hiding a second step's peak).
# Huge pages off there: they would round small peaks up to 2 MiB pages.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "THP_MEM_ALLOC_ENABLE": "0"}


# ----------------------------------------------------------------------------- candidates


def moelab_layer(T: int, d: int, E: int, k: int, f: int) -> moelab.MoELayer:
    torch.manual_seed(0)
    layer = moelab.MoELayer(moelab.MoEConfig(d_model=d, num_experts=E, top_k=k, d_expert=f))
    with torch.no_grad():  # a router that is not near-uniform, so top-k has no near-ties
        layer.router.weight.normal_(0.0, 0.1)
    return layer


def dense_params(d: int, k: int, f: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(1)
    w13 = torch.nn.Parameter(torch.randn(d, 2 * k * f) * 0.02)
    w2 = torch.nn.Parameter(torch.randn(k * f, d) * 0.02)
    return [w13, w2]


def hf_implementations() -> list[str]:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.valid_keys())]


def hf_block(layer: moelab.MoELayer, impl: str) -> torch.nn.Module:
    """transformers' Qwen3-MoE sparse block holding ``layer``'s weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = layer.cfg
    hf_cfg = Qwen3MoeConfig(
        hidden_size=cfg.d_model,
        moe_intermediate_size=cfg.d_expert,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=cfg.router.normalize,
        hidden_act="silu",
    )
    hf_cfg._experts_implementation = impl
    block = Qwen3MoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():  # theirs: gate_up (E, 2F, D) [gate; up], down (E, D, F); ours transposed
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.w13_ED2F.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.w2_EFD.transpose(1, 2))
    return block.to(layer.router.weight.device)


def loop_forward(layer: moelab.MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The per-expert loop in plain autograd: (T, D) -> (T, D), same function as the layer."""
    routing = layer.router(x)
    p = dispatch.plan(routing.experts, routing.weights, layer.cfg.num_experts)
    y_SD = layer.experts.forward_split(x.index_select(0, p.token_S), p.splits)
    y_SD = y_SD * p.weight_S.unsqueeze(1)
    return y_SD.new_zeros(x.shape).index_add(0, p.token_S, y_SD)


def step_fns(T: int, d: int, E: int, k: int, f: int, impls: list[str]) -> dict[str, Callable]:
    """name -> a function running one forward+backward on the CPU in fp32 (grads dropped
    before each): :func:`device_fns`' candidates plus the matmul floors, and ``_layer`` /
    ``_x`` for the checks and the breakdown."""
    fns, layer, x, w13, w2 = _candidates((T, d, E, k, f), impls, torch.device("cpu"), "fp32")
    fns.update(matmul_floors(layer, x, w13, w2))
    fns["_layer"], fns["_x"] = layer, x
    return fns


def matmul_floors(layer: moelab.MoELayer, x: torch.Tensor, w13, w2) -> dict[str, Callable]:
    """The six matmuls of a SwiGLU forward+backward and nothing else, into preallocated
    buffers: per expert on its segment of the routed slots (``mm_experts``), as ``bmm`` over
    experts padded to the largest count (``bmm_experts``) and for the dense layer (``mm_dense``).
    Their ratio is how much slower E small matmuls are than one large one of the same FLOPs."""
    with torch.no_grad():
        counts = torch.bincount(layer.router(x).experts.flatten(), minlength=layer.cfg.num_experts)
    sizes = counts.tolist()
    We13, We2 = layer.experts.w13_ED2F.detach(), layer.experts.w2_EFD.detach()
    S, E, D, F2 = int(counts.sum()), We13.shape[0], We13.shape[1], We13.shape[2]
    xs, h13, h, y = (
        torch.randn(S, D),
        torch.empty(S, F2),
        torch.randn(S, F2 // 2),
        torch.empty(S, D),
    )
    g13, g2 = torch.empty_like(We13), torch.empty_like(We2)

    views = list(  # made once, outside the timed function: the floor has no Python slicing
        zip(
            *(t.split(sizes) for t in (xs, h13, h, y)),
            *(t.unbind(0) for t in (We13, We2, g13, g2)),
            strict=True,
        )
    )

    def experts() -> None:
        for x_, h13_, h_, y_, w13_, w2_, g13_, g2_ in views:
            torch.mm(x_, w13_, out=h13_)  # forward
            torch.mm(h_, w2_, out=y_)
            torch.mm(y_, w2_.t(), out=h_)  # backward: dh, dW2, dW13, dx
            torch.mm(h_.t(), y_, out=g2_)
            torch.mm(x_.t(), h13_, out=g13_)
            torch.mm(h13_, w13_.t(), out=y_)

    M = max(sizes)  # padded: every expert gets M rows
    P = [torch.randn(E * M, n).view(E, M, n) for n in (D, F2, F2 // 2, D)]

    def experts_bmm() -> None:
        x_, h13_, h_, y_ = P
        torch.bmm(x_, We13, out=h13_)
        torch.bmm(h_, We2, out=y_)
        torch.bmm(y_, We2.transpose(1, 2), out=h_)
        torch.bmm(h_.transpose(1, 2), y_, out=g2)
        torch.bmm(x_.transpose(1, 2), h13_, out=g13)
        torch.bmm(h13_, We13.transpose(1, 2), out=y_)

    W13, W2 = w13.detach(), w2.detach()
    T = x.shape[0]
    X, H13, H, Y = (
        torch.randn(T, D),
        torch.empty(T, W13.shape[1]),
        torch.randn(T, W2.shape[0]),
        torch.empty(T, D),
    )
    G13, G2 = torch.empty_like(W13), torch.empty_like(W2)

    def dense() -> None:
        torch.mm(X, W13, out=H13)
        torch.mm(H, W2, out=Y)
        torch.mm(Y, W2.t(), out=H)
        torch.mm(H.t(), Y, out=G2)
        torch.mm(X.t(), H13, out=G13)
        torch.mm(H13, W13.t(), out=Y)

    return {"mm_experts": experts, "bmm_experts": experts_bmm, "mm_dense": dense}


def check_hf(layer: moelab.MoELayer, x: torch.Tensor, impl: str) -> float:
    """Max |moelab − transformers| of outputs, input gradients and down-projection gradients."""
    block = hf_block(layer, impl)

    def w2_grad_err() -> float:
        theirs = block.experts.down_proj.grad.transpose(1, 2)
        return (layer.experts.w2_EFD.grad - theirs).abs().max().item()

    return _check_same(
        layer, x, f"hf_{impl}", lambda xi: block(xi.unsqueeze(0)).squeeze(0), w2_grad_err
    )


def check_loop(layer: moelab.MoELayer, x: torch.Tensor) -> float:
    """Max |moelab − loop| of outputs and input gradients (the two share the weights)."""
    return _check_same(layer, x, "loop", lambda xi: loop_forward(layer, xi))


def _check_same(
    layer: moelab.MoELayer,
    x: torch.Tensor,
    name: str,
    other: Callable[[torch.Tensor], torch.Tensor],
    extra: Callable[[], float] | None = None,
) -> float:
    """Max |moelab − other| of outputs and input gradients (and ``extra()``, read after both
    backward passes); asserts it is within 1e-4 of the output's scale."""
    g = torch.randn_like(x)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    ys = [layer(xs[0]).output, other(xs[1])]
    for y in ys:
        (y * g).sum().backward()
    errs = [(ys[0] - ys[1]).abs().max().item(), (xs[0].grad - xs[1].grad).abs().max().item()]
    if extra is not None:
        errs.append(extra())
    layer.zero_grad(set_to_none=True)
    err, scale = max(errs), ys[0].abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"{name} differs from moelab by {err}"
    return err


# ----------------------------------------------------------------------------- timing


def interleaved(
    fns: dict[str, Callable], rounds: int, warmup: int = 1, clock: Callable = time.perf_counter
) -> dict[str, list[float]]:
    """Seconds per call for every candidate, each round running all candidates in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def quartiles(xs: list[float]) -> list[float]:
    """[first quartile, median, third quartile] of per-round values (one round: it, thrice)."""
    if len(xs) < 2:
        return xs * 3
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return [q1, q2, q3]


def verdict(q: list[float], limit: float) -> str:
    """'met' when even the third quartile of the per-round ratios is within the limit, 'not
    met' when even the first quartile is over it, else 'within round-to-round spread'."""
    if q[2] <= limit:
        return "met"
    return "not met" if q[0] > limit else "within round-to-round spread"


def one_thread_cpu(fns: dict[str, Callable], rounds: int) -> dict[str, float]:
    """Median CPU seconds of the calling thread with one intra-op thread: a load-robust
    measure of the work itself (a shared, oversubscribed machine inflates 2-thread wall
    time by the synchronisation cost of every parallel region, which punishes many small
    ops far more than a few large ones)."""
    torch.set_num_threads(1)
    try:
        times = interleaved(fns, rounds, clock=time.thread_time)
    finally:
        torch.set_num_threads(THREADS)
    return {n: statistics.median(t) for n, t in times.items()}


def breakdown_fns(layer: moelab.MoELayer, x: torch.Tensor) -> dict[str, Callable]:
    """moelab's parts, each timed alone with its own forward and backward.

    router: gate + routing. dispatch: plan + permute + unpermute (as separate steps, the path
    expert parallelism uses). experts: the SwiGLU segments on the permuted buffer.
    fused_dispatch_experts: permute + experts + unpermute as the single autograd node the
    single-process layer runs (``Experts.forward_tokens``).
    """
    T, E = x.shape[0], layer.cfg.num_experts
    routing = layer.router(x.detach())
    experts_TK, weights_TK = routing.experts, routing.weights.detach().requires_grad_()
    p = dispatch.plan(experts_TK, weights_TK, E)
    x_SD = dispatch.permute(x.detach(), p).detach().requires_grad_()
    g_TD, g_SD = torch.randn_like(x), torch.randn_like(x_SD)
    x_ = x.detach().requires_grad_()

    def router() -> None:
        layer.zero_grad(set_to_none=True)
        r = layer.router(x_)
        r.weights.backward(torch.ones_like(r.weights))

    def plan() -> None:
        dispatch.plan(experts_TK, weights_TK, E)

    def dispatch_step() -> None:
        q = dispatch.plan(experts_TK, weights_TK, E)
        dispatch.unpermute(dispatch.permute(x_, q), q, T).backward(g_TD)

    def experts() -> None:
        layer.zero_grad(set_to_none=True)
        layer.experts(x_SD, p.splits).backward(g_SD)

    def fused() -> None:
        layer.zero_grad(set_to_none=True)
        q = dispatch.plan(experts_TK, weights_TK, E)
        layer.experts.forward_tokens(x_, q.token_S, q.weight_S, q.splits).backward(g_TD)

    return {
        "router": router,
        "plan": plan,
        "dispatch": dispatch_step,
        "experts": experts,
        "fused_dispatch_experts": fused,
    }


def bench_config(name: str, rounds: int, impls: list[str]) -> dict:
    T, d, E, k, f = CONFIGS[name]
    S = T * k
    usable = [i for i in impls if i != "batched_mm" or S * 3 * d * f * 4 <= BATCHED_MM_LIMIT]
    skipped = {
        f"hf_{i}": f"needs {S * 3 * d * f * 4 / 2**30:.0f} GiB of per-slot weight copies"
        for i in impls
        if i not in usable
    }
    layer, x = moelab_layer(T, d, E, k, f), torch.randn(T, d)
    errors = {}
    for impl in list(usable):
        try:
            errors[f"hf_{impl}"] = check_hf(layer, x, impl)
        except (ImportError, RuntimeError, ValueError, NotImplementedError) as exc:
            usable.remove(impl)  # e.g. GPU-only kernels (deepgemm, sonicmoe)
            skipped[f"hf_{impl}"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    errors["loop"] = check_loop(layer, x)
    fns = step_fns(T, d, E, k, f, usable)
    layer, x = fns.pop("_layer"), fns.pop("_x")  # mm_* : the matmul floor, see matmul_floors
    times = interleaved(fns, rounds)
    parts = interleaved(breakdown_fns(layer, x), rounds)
    cpu1 = one_thread_cpu({n: f for n, f in fns.items() if n != "hf_eager" or T <= 256}, 3)
    med = {n: statistics.median(t) for n, t in times.items()}
    spread = {
        n: quartiles([a / b for a, b in zip(t, times["dense"], strict=True)])
        for n, t in times.items()
    }
    ratio = {n: q[1] for n, q in spread.items()}  # median of the per-round ratios
    hf = {n: v for n, v in med.items() if n.startswith("hf_")}
    fastest_hf = min(hf, key=hf.get) if hf else None
    out = {
        "shape": dict(T=T, d=d, E=E, k=k, f=f),
        "seconds_median": med,
        "ratio_to_dense_median": ratio,
        "ratio_to_dense_quartiles": spread,
        "moelab_breakdown_seconds": {n: statistics.median(t) for n, t in parts.items()},
        "one_thread_cpu_seconds": cpu1,
        "one_thread_cpu_ratio_to_dense": {n: v / cpu1["dense"] for n, v in cpu1.items()},
        "max_abs_error_vs_moelab": errors,
        "hf_skipped": skipped,
        "rounds": rounds,
    }
    if fastest_hf:
        out["fastest_hf"] = fastest_hf
        out["fastest_hf_over_moelab"] = statistics.median(
            a / b for a, b in zip(times[fastest_hf], times["moelab"], strict=True)
        )
    if fastest_hf and fastest_hf in cpu1:
        out["one_thread_cpu_fastest_hf_over_moelab"] = cpu1[fastest_hf] / cpu1["moelab"]
    if name in GOALS:
        out["goal_ratio_to_dense"] = GOALS[name]
        out["meets_goal"] = ratio["moelab"] <= GOALS[name]
        out["goal_verdict"] = verdict(spread["moelab"], GOALS[name])
    return out


# ----------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def saved_bytes(fwd: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward during ``fwd``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fwd()
    return sum(seen.values())


def memory_child(name: str, cand: str) -> dict:
    """Run in a fresh process: peak extra RSS of one forward+backward, and saved bytes."""
    torch.set_num_threads(THREADS)
    T, d, E, k, f = CONFIGS[name]
    if cand == "moelab":
        layer = moelab_layer(T, d, E, k, f)
        fwd: Callable[[], torch.Tensor] = lambda: layer(x).output
    else:
        w13, w2 = dense_params(d, k, f)
        fwd = lambda: swiglu(x, w13, w2)
    x = torch.randn(T, d, requires_grad=True)
    g = torch.randn(T, d)
    params = list(layer.parameters()) if cand == "moelab" else [w13, w2]
    saved = saved_bytes(fwd) - sum(p.numel() * p.element_size() for p in params)
    fwd().backward(g)  # warm-up: lazily loaded kernels and libraries are not activations
    for t in [*params, x]:
        t.grad = None
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    fwd().backward(g)
    peak = (_rss_kib("VmHWM") - before) * 1024
    grads = sum(t.grad.numel() * t.grad.element_size() for t in [*params, x])
    return {
        "peak_extra_bytes": peak,
        "param_grad_bytes": grads,
        "peak_activation_bytes": peak - grads,
        "saved_activation_bytes": saved,
    }


def memory(names: list[str]) -> dict:
    out: dict = {}
    for name in names:
        row = {}
        for cand in ("moelab", "dense"):
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, cand],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, **MALLOC_ENV},
            )
            row[cand] = json.loads(proc.stdout.strip().splitlines()[-1])
        m, d = row["moelab"], row["dense"]
        row["peak_activation_ratio"] = m["peak_activation_bytes"] / d["peak_activation_bytes"]
        row["peak_total_ratio"] = m["peak_extra_bytes"] / d["peak_extra_bytes"]
        row["saved_ratio"] = m["saved_activation_bytes"] / d["saved_activation_bytes"]
        row["moelab_activation_bytes_per_token"] = m["peak_activation_bytes"] / CONFIGS[name][0]
        out[name] = row
    return out


# ----------------------------------------------------------------------------- main


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": THREADS,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "thp": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }


def keep_freed_buffers() -> None:
    """glibc: never mmap (hence never unmap) a buffer under 1 GiB and never trim the heap, so
    a freed buffer is reused without page faults. By default every buffer over 32 MiB is its
    own mapping; a fresh 64 MiB weight-gradient stack costs ~30 ms of page faults per step
    here, and an MoE's weight gradients are E/k times the dense layer's."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 2**30) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise RuntimeError("mallopt failed: --malloc keep needs glibc")


def main() -> None:
    enable_huge_pages()  # as the moelab command does
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    ap.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:N: the device benchmark (see the module docstring); default: "
        "the 2-thread CPU benchmark",
    )
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' implementations")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/moe_layer.json"))
    ap.add_argument(
        "--malloc",
        choices=["default", "keep"],
        default="default",
        help="'keep': glibc keeps freed buffers in the heap (mallopt) instead of returning "
        "every buffer over 32 MiB to the OS and page-faulting it back in on the next step",
    )
    ap.add_argument(
        "--memory-child", nargs=2, metavar=("CONFIG", "CANDIDATE"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    if args.device is not None:
        device_main(args)
        return
    args.configs = args.configs or CPU_CONFIGS
    torch.set_num_threads(THREADS)
    if args.malloc == "keep":
        keep_freed_buffers()
    info = machine() | {"malloc": args.malloc}
    impls = [] if args.no_hf else hf_implementations()
    results = {}
    for name in args.configs:
        big = CONFIGS[name][0] > 4096  # no transformers goal there; eager would take minutes
        rounds = max(3, args.rounds // 2) if big else args.rounds
        results[name] = bench_config(name, rounds, [] if big else impls)
        print(name, json.dumps(results[name]["ratio_to_dense_median"]), flush=True)
    mem = memory([n for n in ("A_T256", "A", "A_T16384") if n in args.configs] or args.configs)
    info["loadavg_end"] = os.getloadavg()
    report = {"machine": info, "speed": results, "memory": mem, "goals": _goals(results, mem)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["goals"], indent=2))


# ----------------------------------------------------------------------------- on a device


def _autocast(dev: torch.device, dtype: str):
    return (
        torch.autocast(dev.type, dtype=torch.bfloat16)
        if dtype == "bf16"
        else (contextlib.nullcontext())
    )


def device_fns(shape: tuple, impls: list[str], dev: torch.device, dtype: str) -> dict:
    """name -> one forward+backward on ``dev`` under ``dtype`` (autocast for bf16)."""
    return _candidates(shape, impls, dev, dtype)[0]


def _candidates(shape: tuple, impls: list[str], dev: torch.device, dtype: str) -> tuple:
    """(name -> one forward+backward step, the moelab layer, the input x (T, d), the dense
    floor's w13 and w2): moelab, dense, loop and each transformers implementation in
    ``impls``, on ``dev`` under ``dtype``, the gradients dropped before each step."""
    T, d, E, k, f = shape
    layer = moelab_layer(T, d, E, k, f).to(dev)
    w13, w2 = (p.detach().to(dev).requires_grad_() for p in dense_params(d, k, f))
    torch.manual_seed(2)
    x = torch.randn(T, d, device=dev, requires_grad=True)
    g = torch.randn(T, d, device=dev)

    def run(fwd: Callable[[], torch.Tensor], params: list) -> Callable:
        def step() -> None:
            for p in params:
                p.grad = None
            x.grad = None
            with _autocast(dev, dtype):
                y = fwd()
            y.backward(g.to(y.dtype))

        return step

    fns = {
        "moelab": run(lambda: layer(x).output, list(layer.parameters())),
        "dense": run(lambda: swiglu(x, w13, w2), [w13, w2]),
        "loop": run(lambda: loop_forward(layer, x), list(layer.parameters())),
    }
    for impl in impls:
        block = hf_block(layer, impl)
        fns[f"hf_{impl}"] = run(
            lambda b=block: b(x.unsqueeze(0)).squeeze(0), list(block.parameters())
        )
    return fns, layer, x, w13, w2


def _synced(dev: torch.device) -> Callable[[], float]:
    """A clock that first waits for the device's queued work (kernels run asynchronously)."""

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    return clock


def _peak_bytes(fn: Callable, dev: torch.device) -> int | None:
    """Device memory one more call allocates at its peak (None off CUDA)."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def _usable_hf(shape: tuple, impls: list[str], dev: torch.device, dtype: str) -> tuple:
    """transformers' implementations that run here (checked against moelab at fp32, one
    step at bf16), their errors against moelab, and why the others were skipped."""
    T, d, E, k, f = shape
    layer, x = moelab_layer(*shape).to(dev), torch.randn(T, d, device=dev)
    usable, errors, skipped = [], {}, {}
    for impl in impls:
        if impl == "batched_mm" and T * k * 3 * d * f * 4 > BATCHED_MM_LIMIT:
            skipped[f"hf_{impl}"] = "per-slot weight copies over the limit"
            continue
        try:
            if dtype == "fp32":
                errors[f"hf_{impl}"] = check_hf(layer, x, impl)
            else:
                device_fns(shape, [impl], dev, dtype)[f"hf_{impl}"]()
            usable.append(impl)
        except (ImportError, RuntimeError, ValueError, NotImplementedError, AssertionError) as e:
            skipped[f"hf_{impl}"] = f"{type(e).__name__}: {str(e)[:160]}"
    if dtype == "fp32":
        errors["loop"] = check_loop(layer, x)
    return usable, errors, skipped


def bench_device(name: str, rounds: int, impls: list[str], dev: torch.device, dtype: str) -> dict:
    """One shape on ``dev`` in ``dtype``: median seconds per step, per-round ratios to dense,
    peak memory per candidate, the expert kernel moelab ran."""
    shape = CONFIGS[name]
    usable, errors, skipped = _usable_hf(shape, impls, dev, dtype)
    fns = device_fns(shape, usable, dev, dtype)
    times = interleaved(fns, rounds, warmup=2, clock=_synced(dev))
    med = {n: statistics.median(t) for n, t in times.items()}
    spread = {
        n: quartiles([a / b for a, b in zip(t, times["dense"], strict=True)])
        for n, t in times.items()
    }
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    grouped = experts_mod.GROUPED_MM != "off" and experts_mod.grouped_mm_runs(
        dev, torch_dtype, shape[1], shape[4]
    )
    out = {
        "shape": dict(zip("T d E k f".split(), shape, strict=True)),
        "dtype": dtype,
        "moelab_experts_kernel": "grouped_mm" if grouped and dev.type == "cuda" else "per_expert",
        "seconds_median": med,
        "ratio_to_dense_median": {n: q[1] for n, q in spread.items()},
        "ratio_to_dense_quartiles": spread,
        "peak_bytes": {n: _peak_bytes(fn, dev) for n, fn in fns.items()},
        "max_abs_error_vs_moelab": errors,
        "hf_skipped": skipped,
        "rounds": rounds,
    }
    hf = {n: v for n, v in med.items() if n.startswith("hf_")}
    if hf:
        fastest = min(hf, key=hf.get)
        out["fastest_hf"] = fastest
        out["fastest_hf_over_moelab"] = statistics.median(
            a / b for a, b in zip(times[fastest], times["moelab"], strict=True)
        )
    return out


def device_main(args: argparse.Namespace) -> None:
    """The device benchmark: every config in every dtype, one JSON (see the docstring)."""
    from moelab import device as device_mod

    dev = device_mod.resolve(args.device, "--device")
    impls = [] if args.no_hf else hf_implementations()
    names = args.configs or DEVICE_CONFIGS
    results: dict[str, dict] = {}
    for dtype in args.dtypes:
        for name in names:
            r = bench_device(name, args.rounds, impls, dev, dtype)
            results.setdefault(dtype, {})[name] = r
            print(dtype, name, json.dumps(r["ratio_to_dense_median"]), flush=True)
    info = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "grouped_mm": experts_mod.GROUPED_MM,
    }
    report = {"machine": info, "speed": results, "goals": _device_goals(results)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["goals"], indent=2))


def _device_goals(results: dict) -> dict:
    """Issue 17's goals at A in bf16: moelab/dense <= 1.3; no transformers kernel faster."""
    goals = {}
    for name, limit in DEVICE_GOALS.items():
        r = results.get("bf16", {}).get(name)
        if r is None:
            continue
        goals[f"{name} bf16: moelab/dense <= {limit}"] = r["ratio_to_dense_median"]["moelab"]
        if "fastest_hf" in r:
            goals[f"{name} bf16: {r['fastest_hf']}/moelab >= 1"] = r["fastest_hf_over_moelab"]
    return goals


def _goals(results: dict, mem: dict) -> dict:
    goals = {}
    for name, limit in GOALS.items():
        if name in results:
            r = results[name]
            goals[f"{name}: moelab/dense <= {limit} (2-thread wall)"] = r["ratio_to_dense_median"][
                "moelab"
            ]
            goals[f"{name}: verdict from the per-round quartiles (2-thread wall)"] = r[
                "goal_verdict"
            ]
            goals[f"{name}: moelab/dense <= {limit} (1-thread CPU)"] = r[
                "one_thread_cpu_ratio_to_dense"
            ]["moelab"]
    if "A" in results and "fastest_hf_over_moelab" in results["A"]:
        r = results["A"]
        goals[f"A: {r['fastest_hf']}/moelab >= {HF_SPEEDUP_GOAL} (2-thread wall)"] = r[
            "fastest_hf_over_moelab"
        ]
        goals[f"A: {r['fastest_hf']}/moelab >= {HF_SPEEDUP_GOAL} (1-thread CPU)"] = r.get(
            "one_thread_cpu_fastest_hf_over_moelab"
        )
    for name, row in mem.items():
        goals[f"{name}: peak activation memory moelab/dense <= {MEMORY_GOAL}"] = row[
            "peak_activation_ratio"
        ]
    per_token = {n: r["moelab_activation_bytes_per_token"] for n, r in mem.items()}
    if len(per_token) > 1:
        goals["moelab peak activation bytes per token (flat = linear in T)"] = per_token
        by_T = sorted((CONFIGS[n][0], r["moelab"]["peak_activation_bytes"]) for n, r in mem.items())
        goals["moelab marginal activation bytes per extra token, between consecutive T"] = {
            f"{t0}->{t1}": (m1 - m0) / (t1 - t0)
            for (t0, m0), (t1, m1) in zip(by_T, by_T[1:], strict=False)
        }
    return goals


if __name__ == "__main__":
    main()
