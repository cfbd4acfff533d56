"""The one trainer: ``train(config, out_dir)``. The demo, the lab and the CLI all call it.
One optimizer step (micro-batches, clipping, the LR schedule) is in :mod:`moelab.step`.

AdamW, linear warm-up + cosine decay, gradient clipping, gradient accumulation (global-scope
balance statistics accumulate across micro-batches), optional bf16 autocast (the router stays
fp32), periodic evaluation, metrics.jsonl + TensorBoard, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab import checkpoint, metrics, runfolder
from moelab.config import to_dict
from moelab.data import Batcher, Corpus, load_corpus
from moelab.evaluate import check_evaluable, evaluate
from moelab.logs import MetricsLog, step_row
from moelab.model import MoELM
from moelab.runconfig import (  # noqa: F401 - re-exported: moelab.train is the public entry
    PRESETS,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    build_config,
    load_config_dict,
    load_run_config,
    preset_names,
)
from moelab.signals import Interrupted, StopFlag, stop_on_signals
from moelab.step import (  # noqa: F401 - re-exported: the step is part of the trainer
    NonFiniteError,
    StepResult,
    lr_at,
    train_step,
)
from moelab.world import LocalWorld, World, make_world

# ----------------------------------------------------------------------------- setup


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, the router and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "router" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def build_model(cfg: RunConfig, corpus: Corpus) -> tuple[RunConfig, MoELM]:
    """Fill the vocab size from the tokenizer and build the model (seeded)."""
    if cfg.model.vocab_size == 0:
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, vocab_size=corpus.vocab_size)
        )
    elif cfg.model.vocab_size < corpus.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
            f"{corpus.vocab_size}; set model.vocab_size=0 to take the tokenizer's"
        )
    if cfg.model.max_seq_len < cfg.data.seq_len:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    torch.manual_seed(cfg.train.seed)
    return cfg, MoELM(cfg.model, activation_checkpointing=cfg.train.activation_checkpointing)


# ----------------------------------------------------------------------------- the loop

# Called before every optimizer step with (step, model), step 1-based as logged (fault injection
# in tests, custom probes). The step's data and schedule do not depend on it.
StepHook = Callable[[int, MoELM], None]


def _micro_batches(batch, cfg: RunConfig, world: World) -> list:
    local = batch if cfg.parallel.batch == "per_rank" else batch.shard(world.dp_rank, world.dp_size)
    mbs = cfg.train.micro_batch_size or len(local)
    if len(local) % mbs:
        raise ValueError(
            f"train.micro_batch_size={mbs} must divide the per-rank batch of {len(local)} "
            "sequences (train.batch_size / data-parallel ranks)"
        )
    return local.split(len(local) // mbs)


# ----------------------------------------------------------------------------- entry point


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
    on_step: StepHook | None = None,
    overwrite: bool = False,
    allow_change: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Train ``cfg`` writing metrics.jsonl, config.json, checkpoints and summary.json to
    ``out_dir``; returns the summary. ``max_steps`` stops early (the schedule still spans
    ``train.steps``); ``resume`` continues from the latest checkpoint in ``out_dir``, or starts
    fresh when there is none yet (so one command line serves a first run and its restarts).
    ``on_step(step, model)`` runs before every optimizer step.

    The run folder is guarded (:mod:`moelab.runfolder`): one writer at a time, a folder holding
    another run is refused unless ``resume`` or ``overwrite``, and a resume must keep the
    checkpoint's config apart from :data:`moelab.runfolder.RESUMABLE` and ``allow_change``.
    SIGINT / SIGTERM save a checkpoint at the step in progress and raise
    :class:`moelab.signals.Interrupted` (:mod:`moelab.signals`)."""
    out = Path(out_dir)
    if max_steps is not None and (isinstance(max_steps, bool) or max_steps < 1):
        raise ValueError(f"--max-steps {max_steps!r} is out of range; allowed: an integer >= 1")
    world = make_world(cfg.parallel) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else LocalWorld()
    runfolder.check_world(cfg.parallel.ep, world.world_size)
    if world.is_main:
        runfolder.check_writable(out)
    with runfolder.lock(out, enabled=world.is_main):
        if resume and checkpoint.latest(out) is None:
            if world.is_main:
                print(f"moelab: no checkpoint in {str(out)!r} yet; starting fresh", file=sys.stderr)
            resume = False
        elif not resume and world.is_main:
            runfolder.check_new_run(out, overwrite=overwrite)
        return _train(cfg, out, world, resume, max_steps, progress, on_step, tuple(allow_change))


def _train(cfg, out, world, resume, max_steps, progress, on_step, allow_change) -> dict[str, Any]:
    """The body of :func:`train`, run while holding the folder's lock."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    corpus = load_corpus(cfg.data)
    check_evaluable(corpus, seq_len=cfg.data.seq_len)  # before any step, not at the end
    cfg, model = build_model(cfg, corpus)
    model = world.prepare(model, cfg)
    opt = make_optimizer(model, cfg.train)
    batcher = Batcher(
        corpus,
        batch_size=_global_batch(cfg, world),
        seq_len=cfg.data.seq_len,
        mode=cfg.data.batch_mode,
        seed=cfg.train.seed,
        group=cfg.data.domain_group,
    )
    trackers = [
        metrics.DeadExpertTracker(layer.cfg.num_experts, top_k=layer.cfg.top_k)
        for layer in model.moe_layers
    ]
    state = (cfg, model, opt, batcher, trackers, world)
    start = _restore(out, *state, corpus.digest, allow_change) if resume else 0
    if not resume:
        seed_everything(cfg.train.seed + 1 + world.rank)
    stop = min(cfg.train.steps, max_steps or cfg.train.steps)
    if resume and stop <= start:
        return _nothing_to_train(out, start, stop)
    log = MetricsLog(
        out,
        enabled=world.is_main,
        tensorboard=cfg.train.tensorboard,
        truncate_after=start if resume else 0,
    )
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    hooks = [h for h in (on_step, _injected_crash()) if h is not None]
    try:
        with stop_on_signals() as flag:
            return _loop(
                cfg, model, opt, batcher, corpus, trackers, world, log, out, start, stop,
                progress, hooks, flag, corpus.digest,
            )  # fmt: skip
    finally:
        log.close()


def _nothing_to_train(out: Path, start: int, stop: int) -> dict[str, Any]:
    """A resume whose stop is not past the checkpoint: refuse one below it; at it, the run is
    done and its files stay as they are (its summary is returned)."""
    if stop < start:
        raise ValueError(
            f"the run would stop at step {stop} (--max-steps / train.steps) but its checkpoint "
            f"in {str(out)!r} is at step {start}; allowed: --max-steps above {start}, or a new "
            "--out"
        )
    print(f"moelab: {str(out)!r} is already at step {start}; nothing to train", file=sys.stderr)
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {"steps": start}


def _injected_crash() -> StepHook | None:
    """Test-only fault: ``MOELAB_CRASH_AT_STEP=K`` raises before step K on the first attempt
    (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a torchrun restart runs through."""
    at = int(os.environ.get("MOELAB_CRASH_AT_STEP", "0"))
    if at <= 0 or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None

    def crash(step: int, model: MoELM) -> None:
        if step == at:
            raise RuntimeError(f"injected crash before step {at} (MOELAB_CRASH_AT_STEP)")

    return crash


def _global_batch(cfg: RunConfig, world: World) -> int:
    if cfg.parallel.batch == "per_rank":
        return cfg.train.batch_size
    if cfg.train.batch_size % world.dp_size:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by the "
            f"{world.dp_size} data-parallel ranks"
        )
    return cfg.train.batch_size


def _loop(
    cfg, model, opt, batcher, corpus, trackers, world, log, out, start, stop, progress, hooks,
    flag: StopFlag, digest: str,
) -> dict[str, Any]:  # fmt: skip
    tokens_per_step = (
        cfg.train.batch_size
        * cfg.data.seq_len
        * (world.dp_size if cfg.parallel.batch == "per_rank" else 1)
    )
    bar = _progress(start, stop, progress and world.is_main)
    t0, last_eval = time.perf_counter(), {}
    for step in range(start, stop):
        batch = batcher.batch_at(
            step if cfg.parallel.batch == "global" else step * world.dp_size + world.dp_rank
        )
        batcher.step = step + 1
        for hook in hooks:
            hook(step + 1, model)
        done = step + 1
        logged = done % cfg.train.log_every == 0 or done == 1 or done == stop
        gap = cfg.train.train_eval_gap and logged
        r = train_step(
            model, opt, _micro_batches(batch, cfg, world), cfg, world, step, measure_gap=gap
        )
        if r.skipped:
            log.write({"step": done, "skipped": True, "nonfinite": r.nonfinite})
        else:
            for tr, c in zip(trackers, r.step_counts(), strict=True):
                tr.update(c)
        if not r.skipped and logged:
            elapsed = time.perf_counter() - t0
            row = step_row(
                done,
                r,
                model,
                trackers,
                lr_at(step, cfg.train),
                tokens_per_step * done,
                tokens_per_step * (done - start) / elapsed,
            )
            row |= world.extra_stats(r, model)
            log.write(row)
            bar.set_postfix(loss=f"{r.loss:.3f}", maxvio=f"{row.get('maxvio_batch', 0):.2f}")
        if _due(done, cfg.train.eval_every, stop):
            last_eval = evaluate(
                model,
                corpus,
                batch_size=cfg.train.batch_size,
                seq_len=cfg.data.seq_len,
                max_tokens=cfg.train.eval_max_tokens,
                world=world,
            )
            log.write({"step": done, **last_eval})
        saved = _due(done, cfg.train.ckpt_every, stop)
        if saved:
            _save(out, cfg, model, opt, batcher, trackers, world, done, digest)
        bar.update(1)
        if done < stop and _stop_requested(flag, world):
            if not saved:
                _save(out, cfg, model, opt, batcher, trackers, world, done, digest)
            bar.close()
            raise Interrupted(flag.signum or signal.SIGTERM, done, out)
    bar.close()
    return _summary(
        cfg, model, last_eval, stop, tokens_per_step, time.perf_counter() - t0, out, world
    )


def _stop_requested(flag: StopFlag, world: World) -> bool:
    """Whether a stop signal arrived on any rank (all ranks agree, so they stop together)."""
    raised = 1.0 if flag.signum is not None else 0.0
    return (world.mean(raised) if world.world_size > 1 else raised) > 0


def _due(done: int, every: int, stop: int) -> bool:
    return done == stop or (every > 0 and done % every == 0)


def _progress(start: int, stop: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=stop, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)


def _summary(cfg, model, last_eval, stop, tokens_per_step, elapsed, out, world) -> dict:
    params = model.count_params()
    summary = {
        "steps": stop,
        "tokens": tokens_per_step * stop,
        "params": params["total"],
        "active_params": params["active"],
        "seconds": elapsed,
        **last_eval,
    }
    if world.is_main:
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------- checkpoints


def _save(out, cfg, model, opt, batcher, trackers, world, step, digest: str = "") -> None:
    """Full (single-process layout) state; every rank checks it is finite, rank 0 writes."""
    state = {
        "model": world.full_state_dict(model),
        "optimizer": world.optimizer_state(opt, model),
        "batcher": batcher.state_dict(),
        "trackers": [t.state_dict() for t in trackers],
        "rng": world.gather_rng(rng_state()),
        "step": step,
        "config": to_dict(cfg),
        "layout": {"world_size": world.world_size, "ep": cfg.parallel.ep},
        "data_digest": digest,
    }
    checkpoint.check_finite(state, step)  # on every rank, so that all of them stop together
    if world.is_main:
        checkpoint.save(out, state, step, keep=cfg.train.keep_checkpoints)
    world.barrier()


def _restore(
    out, cfg, model, opt, batcher, trackers, world, digest: str | None = None, allow_change=()
) -> int:
    """Load the latest checkpoint of ``out`` into the run's state; returns its step. Refuses
    one written for another config or (given the corpus ``digest``) other data
    (:func:`moelab.runfolder.check_resume`, :func:`moelab.runfolder.check_data`)."""
    state = checkpoint.load(out)
    _check_layout(out, cfg, world, state.get("layout"))  # the more specific message first
    runfolder.check_resume(out, state["config"], to_dict(cfg), allow=allow_change)
    if digest is not None:
        runfolder.check_data(out, state.get("data_digest"), digest)
    world.load_full_state_dict(model, state["model"])
    world.load_optimizer_state(opt, model, state["optimizer"])
    batcher.load_state_dict(state["batcher"])
    for t, s in zip(trackers, state["trackers"], strict=True):
        t.load_state_dict(s)
    set_rng_state(world.pick_rng(state["rng"]))
    return int(state["step"])


def _check_layout(out, cfg: RunConfig, world: World, saved: dict | None) -> None:
    """Checkpoints hold the single-process layout, so any EP size loads (experts re-sharded);
    with ``parallel.batch = "per_rank"`` the world size sets the batch and must not change."""
    if saved is None or cfg.parallel.batch != "per_rank" or saved["world_size"] == world.world_size:
        return
    raise checkpoint.CheckpointError(
        f"checkpoint in {str(out)!r} was written by {saved['world_size']} ranks with "
        f"parallel.batch='per_rank' (batch of {saved['world_size']}x{cfg.train.batch_size} "
        f"sequences); resume with {saved['world_size']} ranks or start a new --out folder"
    )
