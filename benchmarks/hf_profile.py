"""Benchmark moelab.hf on a tiny random transformers MoE model; writes JSON, asserts nothing.

1. Profiling throughput: tokens/s of ``profile_model`` (hooks + statistics) against the plain
   no-grad forward over the same batches.
2. Training-step overhead of ``attach`` (loss-free bias + global aux + z-loss, patched routers)
   against the model's own aux loss (``output_router_logits=True``), AdamW step included.

    python benchmarks/hf_profile.py [--device cuda] [--kind qwen3_moe] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moelab.config import BalanceConfig  # noqa: E402
from moelab.hf import attach, profile_model  # noqa: E402
from moelab.hf.tiny import tiny_config  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(kind: str, device: str, args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(
        kind, layers=args.layers, hidden=args.hidden, experts=args.experts, vocab=1024
    )
    return AutoModelForCausalLM.from_config(cfg).to(device)


def bench_profile(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """tokens/s of the plain forward and of profile_model over the same batches."""
    gen = torch.Generator().manual_seed(1)
    stream = torch.randint(0, 1024, (args.tokens,), generator=gen)
    streams = {"a": stream[: args.tokens // 2], "b": stream[args.tokens // 2 :]}
    ids_NL = stream[: args.tokens // args.seq_len * args.seq_len].view(-1, args.seq_len)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids_NL[: args.batch_size].to(args.device))  # warm-up
        sync(args.device)
        t0 = time.perf_counter()
        for ids_BL in ids_NL.split(args.batch_size):
            model(input_ids=ids_BL.to(args.device), use_cache=False)
        sync(args.device)
        plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result, _ = profile_model(model, streams, seq_len=args.seq_len, batch_size=args.batch_size)
    profile_s = time.perf_counter() - t0
    return {
        "tokens": args.tokens,
        "forward_tokens_per_s": ids_NL.numel() / plain_s,
        "profile_tokens_per_s": args.tokens / profile_s,
        "profile_forward_only_tokens_per_s": result["tokens_per_s"],
        "profile_time_per_token_vs_forward": (profile_s / args.tokens) / (plain_s / ids_NL.numel()),
    }


def time_steps(model, step_fn, args: argparse.Namespace) -> float:
    """Mean seconds per training step after two warm-up steps."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1024, (args.steps + 2, args.batch_size, args.seq_len), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for n, ids_BL in enumerate(ids.to(args.device)):
        if n == 2:
            sync(args.device)
            t0 = time.perf_counter()
        loss = step_fn(ids_BL)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(args.device)
    return (time.perf_counter() - t0) / args.steps


def bench_train(kind: str, args: argparse.Namespace) -> dict:
    """Seconds per step: the model's own aux loss vs moelab's attached balancing."""
    model = build(kind, args.device, args).train()
    own = lambda ids: model(input_ids=ids, labels=ids, output_router_logits=True).loss
    own_s = time_steps(model, own, args)
    handle = attach(
        model, BalanceConfig(bias_rate=1e-3, aux_coef=1e-2, aux_scope="global", z_coef=1e-3)
    )

    def attached(ids):
        loss = model(input_ids=ids, labels=ids).loss + handle.aux_loss()
        handle.end_step()  # bias update placed after backward in real loops; same cost
        return loss

    moelab_s = time_steps(model, attached, args)
    return {"own_aux_step_s": own_s, "attach_step_s": moelab_s, "overhead": moelab_s / own_s - 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kind", default="qwen3_moe", help="model family for both benchmarks")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_profile.json"))
    args = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2) if args.device == "cpu" else 4)
    model = build(args.kind, args.device, args)
    report = {
        "benchmark": "hf_profile",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "host": platform.node(),
        "torch": torch.__version__,
        "model": {
            "kind": args.kind,
            "layers": args.layers,
            "hidden": args.hidden,
            "experts": args.experts,
            "top_k": 2,
        },  # fmt: skip
        "batch": {"batch_size": args.batch_size, "seq_len": args.seq_len},
        "profile": bench_profile(model, args),
        "train_step": bench_train(args.kind, args),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
