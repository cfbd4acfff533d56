"""``moelab demo``: train the same small MoE three ways plus its dense twin, then write a report.

Runs (same preset, same seed, same data order): ``none`` (no balancing: watch it collapse),
``aux`` (Switch aux loss, Fedus et al. 2022 eq. 4), ``loss-free`` (selection bias, Wang et al.
2024 Alg. 1) and ``dense`` (the dense model with the same active parameters, the loss
baseline). Every run goes through the one trainer, ``moelab.train.train``. A run whose
``summary.json`` exists for the same resolved config is skipped, so a rerun after a crash only
trains what is missing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from moelab.config import to_dict
from moelab.runconfig import RunConfig, load_run_config
from moelab.train import train

DENSE_PRESET = "dense-tiny"
REQUEST_FILE = "demo_request.json"
TIMING_FILE = "demo_timing.json"
DEFAULT_STEPS = 150  # the lab's collapse experiment size: the story shows (see results/collapse)


@dataclass(frozen=True)
class DemoRun:
    """One demo run: a name (its folder), a preset and the ``--set`` overrides of its method."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()


def demo_runs(preset: str = "tiny", dense_preset: str = DENSE_PRESET) -> list[DemoRun]:
    """The four runs of the demo, in report order."""
    return [
        DemoRun("none", preset),
        DemoRun("aux", preset, ("model.moe.balance.aux_coef=0.01",)),
        DemoRun("loss-free", preset, ("model.moe.balance.bias_rate=1e-3",)),
        DemoRun("dense", dense_preset),
    ]


def schedule_overrides(steps: int, *, quick: bool, seed: int) -> list[str]:
    """Overrides shared by every run: length, logging/eval cadence, seed (presets stay as is).

    Evaluation is capped at 4096 validation tokens per domain, so that the four evaluations of
    a run cost about as much as a few training steps; ``quick`` shrinks the batch, evaluates
    once at the end and uses one thread.
    """
    every = max(1, steps // 4)
    out = [
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"train.eval_every={every}",
        f"train.log_every={max(1, min(5, steps // 20))}",
        f"train.warmup_steps={min(20, max(1, steps // 10))}",
        "train.eval_max_tokens=4096",
        "train.tensorboard=false",
    ]
    if quick:  # one thread: smoke tests often share the cores with other jobs
        out += [
            "train.batch_size=4",
            "data.seq_len=64",
            f"train.eval_every={steps}",
            "train.eval_max_tokens=256",
            "train.threads=1",
        ]
    return out


def resolve(run: DemoRun, shared: list[str]) -> RunConfig:
    """The run's config: its preset, then the shared schedule, then the method's overrides."""
    return load_run_config(run.preset, [*shared, *run.overrides])


def is_done(run_dir: Path, cfg: RunConfig) -> bool:
    """True when ``run_dir`` holds a finished run (summary.json) of exactly this config."""
    req = run_dir / REQUEST_FILE
    if not (run_dir / "summary.json").exists() or not req.exists():
        return False
    return json.loads(req.read_text()) == to_dict(cfg)


def train_one(run: DemoRun, cfg: RunConfig, run_dir: Path, *, progress: bool) -> dict:
    """Train one run (or skip it when already done); returns timing and summary."""
    if is_done(run_dir, cfg):
        print(f"[demo] {run.name}: finished earlier with this config, skipped", flush=True)
        timing = run_dir / TIMING_FILE
        earlier = json.loads(timing.read_text()) if timing.exists() else {}
        return {**json.loads((run_dir / "summary.json").read_text()), **earlier, "skipped": True}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)  # a crash must not leave a stale one
    (run_dir / REQUEST_FILE).write_text(json.dumps(to_dict(cfg), indent=2))
    print(f"[demo] {run.name}: {run.preset} {' '.join(run.overrides)}".rstrip(), flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    summary = train(cfg, run_dir, progress=progress, overwrite=True)  # its own folder, redone
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"[demo] {run.name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    timing = {"wall_s": wall, "cpu_s": cpu}
    (run_dir / TIMING_FILE).write_text(json.dumps(timing))
    return {**summary, **timing, "skipped": False}


def run_demo(
    out: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    quick: bool = False,
    preset: str = "tiny",
    seed: int = 0,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Train the demo runs into ``out/<name>`` and write ``out/report.html`` + ``report.md``."""
    out = Path(out)
    shared = schedule_overrides(steps, quick=quick, seed=seed)
    runs, timings = {}, {}
    for run in demo_runs(preset):
        cfg = resolve(run, shared)
        result = train_one(run, cfg, out / run.name, progress=progress)
        runs[run.name] = out / run.name
        timings[run.name] = {k: result.get(k) for k in ("skipped", "wall_s", "cpu_s")}
    total = sum(t["wall_s"] or 0.0 for t in timings.values())
    (out / "timings.json").write_text(json.dumps({"total_s": total, **timings}, indent=2))
    from moelab.report import write_report  # matplotlib: imported only once training is done

    return write_report(
        runs,
        out,
        title="moelab demo: balancing the load",
        intro_markdown=_intro(preset, steps, quick, seed, total),
    )


def _intro(preset: str, steps: int, quick: bool, seed: int, total_s: float) -> str:
    size = "quick (smoke-test size)" if quick else f"{steps} steps"
    return (
        f"Four runs of the `{preset}` preset, {size}, seed {seed}, the same data order: "
        "`none` has no load balancing, `aux` adds the Switch auxiliary loss "
        "(`model.moe.balance.aux_coef=0.01`), `loss-free` adds the selection bias of Wang et "
        "al. 2024 (`model.moe.balance.bias_rate=1e-3`), and `dense` is the dense model with "
        f"the same active parameters per token (`{DENSE_PRESET}`), the loss baseline. "
        f"Training took {total_s:.0f} s of wall time in all (runs of earlier invocations "
        "included)."
    )
