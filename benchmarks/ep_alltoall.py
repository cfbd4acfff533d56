"""Expert-parallel all-to-all on this machine (gloo, CPU): writes results/ep_alltoall.json.

1. all-to-all bytes of one training step measured (``Comm.bytes_sent``) vs the analytic value
   (kept slots whose expert lives on another rank × d_model × 4 B × 2 for dispatch + combine,
   × 2 for the backward all-to-alls), and vs ``moelab.placement.layer_stats``;
2. all-to-all time vs message size (2 ranks; small messages are latency-bound);
3. step time of the tiny preset: 1 process vs 2 ranks with parallel.ep=1 (DP) and ep=2.

Run: ``python benchmarks/ep_alltoall.py [--steps 3]`` (takes a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

OUT = Path(__file__).parent / "results" / "ep_alltoall.json"
SIZES = [2**k for k in range(10, 25, 2)]  # bytes sent by each rank: 1 KiB .. 16 MiB


def _setup(steps: int, ep: int, world):
    from moelab.data import Batcher, load_corpus
    from moelab.runconfig import load_run_config
    from moelab.train import build_model, make_optimizer

    cfg = load_run_config("tiny", [f"parallel.ep={ep}", "train.tensorboard=false"])
    corpus = load_corpus(cfg.data)
    cfg, model = build_model(cfg, corpus)
    model = world.prepare(model, cfg)
    batcher = Batcher(corpus, batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len, seed=0)
    return cfg, model, make_optimizer(model, cfg.train), batcher


def _step_times(cfg, model, opt, batcher, world, steps: int) -> list[float]:
    from moelab.step import train_step
    from moelab.train import _micro_batches

    times = []
    for step in range(steps + 1):  # the first step warms up
        micro = _micro_batches(batcher.batch_at(step), cfg, world)
        t0 = time.perf_counter()
        train_step(model, opt, micro, cfg, world, step)
        times.append(time.perf_counter() - t0)
    return times[1:]


def _bytes_check(cfg, model, batcher, world) -> dict:
    """One forward/backward: measured all-to-all bytes vs the analytic count."""
    from moelab import placement
    from moelab.train import _micro_batches

    comm, E = world.comm, cfg.model.moe.num_experts
    (mb,) = _micro_batches(batcher.batch_at(100), cfg, world)
    before = comm.bytes_sent
    out = model(mb.tokens, mb.targets)
    (out.loss + out.aux).backward()
    model.zero_grad()
    measured = comm.bytes_sent - before
    D, El = cfg.model.d_model, E // world.ep
    off = sum(int((o.experts // El != world.layout.ep_index).sum()) for o in out.moe)
    analytic = off * D * 4 * 2 * 2
    experts = [world.comm.all_gather_cat(o.experts, "bench") for o in out.moe]
    sim = sum(
        placement.layer_stats(
            e, E, placement.contiguous_placement(E, world.ep), d_model=D, bytes_per_elt=4
        )["a2a_bytes"]
        for e in experts
    )
    return {"measured": measured, "analytic": analytic, "simulated_all_ranks_fwd": sim}


def _alltoall_times(world) -> list[dict]:
    import torch.distributed as dist

    rows = []
    for size in SIZES:
        n = size // 4
        x = torch.randn(n)
        out = torch.empty(n)
        reps = 30 if size <= 2**16 else 8
        ts = []
        for _ in range(reps + 2):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(out, x)
            ts.append(time.perf_counter() - t0)
        med = statistics.median(ts[2:])
        rows.append({"bytes_per_rank": size, "median_s": med, "GB_per_s": size / med / 1e9})
    return rows


def _worker(rank: int, port: int, steps: int, q) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from moelab.parallel import DistributedWorld
    from moelab.runconfig import ParallelConfig

    res = {}
    for ep in (2, 1):
        world = DistributedWorld(ParallelConfig(ep=ep, timeout_s=300))
        torch.manual_seed(0)
        cfg, model, opt, batcher = _setup(steps, ep, world)
        if ep == 2:
            res["bytes"] = _bytes_check(cfg, model, batcher, world)
            res["alltoall"] = _alltoall_times(world)
        res[f"step_s_ep{ep}"] = _step_times(cfg, model, opt, batcher, world, steps)
    q.put((rank, res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from moelab.world import LocalWorld

    torch.set_num_threads(1)
    world = LocalWorld()
    cfg, model, opt, batcher = _setup(args.steps, 1, world)
    single = _step_times(cfg, model, opt, batcher, world, args.steps)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, port, args.steps, q)) for r in range(2)]
    for p in procs:
        p.start()
    ranks = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    b = [ranks[r]["bytes"] for r in range(2)]
    result = {
        "machine": f"{os.cpu_count()} CPU cores, gloo, torch {torch.__version__}, 1 thread/rank",
        "preset": "tiny (d_model 128, 4 layers, E=16, K=2, batch 16 x 128 tokens)",
        "bytes_per_step": {
            "measured": sum(x["measured"] for x in b),
            "analytic": sum(x["analytic"] for x in b),
            "simulate_ep_formula_x2_backward": 2 * b[0]["simulated_all_ranks_fwd"],
        },
        "alltoall_time_vs_size": ranks[0]["alltoall"],
        "step_s": {
            "1 process": statistics.median(single),
            "2 ranks, ep=1 (data parallel)": statistics.median(ranks[0]["step_s_ep1"]),
            "2 ranks, ep=2": statistics.median(ranks[0]["step_s_ep2"]),
        },
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
