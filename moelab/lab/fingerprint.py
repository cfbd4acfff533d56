"""Numerics fingerprint: what today's training code computes on one fixed micro run.

A lab run is valid for a verdict only if the code that trained it computes the same numbers
as today's code (issue 15 §1). The source hash (``runner.code_hash``) changes with every
refactor, so it cannot tell a harmless edit from a changed formula; the fingerprint can. It
trains a 12-step micro run in which every piece of balancing state is live (loss-free bias,
global-scope aux over 2 micro-batches, router jitter, z-loss) on one intra-op thread, and
records its per-step losses and final per-layer validation counts. Each lab run folder stores
the fingerprint of the code that trained it (``fingerprint.json``); the runner retrains a run
whose fingerprint differs from today's.

Two fingerprints match when they come from the same platform (torch version, CPU kernels,
machine, CPU model) and are equal, or from different platforms when the losses agree to rtol
1e-5 (as the golden test) and at most ``MOVED_SHARE`` of the token-to-expert assignments moved:
kernels differ across CPUs in the last bits, not in what they compute, and a last-bit change
flips the rare near-tie routing decision (an Intel Xeon and an AMD EPYC differ by one of the
micro run's 8,192 assignments). A changed formula moves losses by far more than 1e-5.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from moelab.logs import read_rows

# Fixed forever (changing it invalidates every cached lab run): the micro model of
# tests/fixtures/micro.toml with every balancing mechanism switched on.
MICRO: dict[str, Any] = {
    "model": {
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 2,
        "max_seq_len": 64,
        "moe": {"num_experts": 4, "top_k": 2, "d_expert": 32},
    },
    "data": {
        "seq_len": 32,
        "vocab_size": 512,
        "max_chars_per_domain": 60000,
        "domains": ["literary_kjv", "technical_python_docs"],
    },
    "train": {
        "steps": 12,
        "batch_size": 8,
        "lr": 1e-2,
        "warmup_steps": 3,
        "log_every": 1,
        "eval_every": 0,
        "eval_max_tokens": 1024,
        "tensorboard": False,
        "micro_batch_size": 4,
        "threads": 1,
    },
}
SETS = [
    "model.moe.balance.bias_rate=0.01",
    "model.moe.balance.aux_coef=0.01",
    "model.moe.balance.aux_scope='global'",
    "model.moe.balance.z_coef=0.001",
    "model.moe.router.noise='jitter'",
]
RTOL = 1e-5
MOVED_SHARE = 1e-3  # cross-platform: share of (token, expert) assignments allowed to move


def platform_id() -> dict[str, str]:
    """What decides a CPU run's last bits: torch version, kernel level, machine and CPU model
    (two CPUs of one kernel level, e.g. an AMD EPYC and an Intel Xeon with AVX-512, differ in
    the last bit of some losses: oneDNN / MKL pick kernels per CPU)."""
    return {
        "torch": torch.__version__.split("+")[0],
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "machine": platform.machine(),
        "cpu": cpu_model(),
    }


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@functools.cache
def current() -> dict[str, Any]:
    """Today's fingerprint: ``{"digest", "losses", "counts", "platform"}`` (computed once per
    process; the micro run takes a few seconds)."""
    from moelab.runconfig import build_config
    from moelab.train import train

    # On the CPU always: the platform it names is a CPU's, and a GPU's kernels differ in the
    # last bits (every cached run would look stale on a GPU machine and fresh on a CPU one).
    cfg = build_config(json.loads(json.dumps(MICRO)), [*SETS, "train.device='cpu'"])
    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="moelab-fp-") as tmp:
            train(cfg, Path(tmp) / "run", progress=False)
            rows = read_rows(Path(tmp) / "run" / "metrics.jsonl")
    finally:
        torch.set_num_threads(threads)
    losses = [r["loss"] for r in rows if "loss" in r]
    counts = next(r["counts_layers"] for r in reversed(rows) if "counts_layers" in r)
    return make(losses, counts)


def make(losses: list[float], counts: list[list[float]]) -> dict[str, Any]:
    """A fingerprint record from a micro run's losses and final (L, E) counts."""
    blob = json.dumps([losses, counts]).encode()
    return {
        "digest": hashlib.sha256(blob).hexdigest()[:16],
        "losses": losses,
        "counts": counts,
        "platform": platform_id(),
    }


def matches(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Same numbers: equal digests on one platform; across platforms losses within RTOL and
    counts within :func:`moved_share` ≤ MOVED_SHARE. A missing fingerprint matches nothing."""
    if not a or not b:
        return False
    if a.get("platform") == b.get("platform"):
        return a.get("digest") == b.get("digest")
    la, lb = a.get("losses") or [], b.get("losses") or []
    close = len(la) == len(lb) and all(
        abs(x - y) <= RTOL * abs(y) for x, y in zip(la, lb, strict=True)
    )
    return close and moved_share(a.get("counts"), b.get("counts")) <= MOVED_SHARE


def moved_share(a: list[list[float]] | None, b: list[list[float]] | None) -> float:
    """Share of assignments that moved between two (L, E) count tables: Σ|a − b| / (2·Σb)
    (one token moved from expert i to j changes two cells by 1); 1.0 when the shapes differ."""
    if not a or not b or len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return 1.0
    diff = sum(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(sum(r) for r in b)
    return diff / (2 * total) if total else (0.0 if diff == 0 else 1.0)


def read(run_dir: Path) -> dict[str, Any] | None:
    f = run_dir / "fingerprint.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def write(run_dir: Path, fp: dict[str, Any]) -> None:
    (run_dir / "fingerprint.json").write_text(json.dumps(fp) + "\n")
