"""Training throughput of the smallest preset: MoE vs the dense model with the same active
parameters, measured in one run (alternating steps so machine noise hits both alike).

    python benchmarks/train_throughput.py [--preset tiny] [--steps 30] [--threads 2]

Writes benchmarks/results/train_throughput.json. Goal (issue 4): MoE step time ≤ 1.4× dense.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from moelab.cli import enable_huge_pages
from moelab.data import Batcher, load_corpus
from moelab.runconfig import load_run_config
from moelab.step import train_step
from moelab.train import build_model, make_optimizer
from moelab.world import LocalWorld


def main() -> None:
    enable_huge_pages()  # as the moelab command does
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    moe_cfg = load_run_config(args.preset)
    dense_cfg = load_run_config(
        args.preset, ["model.moe='none'", f"model.d_ff={moe_cfg.model.dense_hidden}"]
    )
    corpus = load_corpus(moe_cfg.data)
    runs = {}
    for name, cfg in (("moe", moe_cfg), ("dense", dense_cfg)):
        cfg, model = build_model(cfg, corpus)
        runs[name] = (cfg, model, make_optimizer(model, cfg.train))
    batcher = Batcher(corpus, batch_size=moe_cfg.train.batch_size, seq_len=moe_cfg.data.seq_len)
    times: dict[str, list[float]] = {"moe": [], "dense": []}
    for step in range(args.steps + 3):
        batch = batcher.batch_at(step)
        for name, (cfg, model, opt) in runs.items():
            t0 = time.perf_counter()
            train_step(model, opt, [batch], cfg, LocalWorld(), step)
            if step >= 3:  # warm-up steps excluded
                times[name].append(time.perf_counter() - t0)
    tokens = moe_cfg.train.batch_size * moe_cfg.data.seq_len
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "preset": args.preset,
        "threads": args.threads,
        "tokens_per_step": tokens,
        "median_step_s": med,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "moe_over_dense_step_time": med["moe"] / med["dense"],
        "goal": "moe_over_dense_step_time <= 1.4",
        "params": {k: runs[k][1].count_params() for k in runs},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
