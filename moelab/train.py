"""The one trainer: ``train(config, out_dir)``. The demo, the lab and the CLI all call it.
One optimizer step (micro-batches, clipping, the LR schedule) is in :mod:`moelab.step`.

AdamW, linear warm-up + cosine decay, gradient clipping, gradient accumulation (global-scope
balance statistics accumulate across micro-batches), on ``train.device`` (the CPU or a GPU,
:mod:`moelab.device`) with optional bf16 autocast (the router stays fp32), periodic
evaluation, metrics.jsonl + TensorBoard, atomic checkpoints (CPU tensors, so they resume on
any device) and exact resume. The loop advances one :class:`moelab.state.TrainerState`, which
also saves and restores itself.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab import checkpoint, device, host, metrics, runfolder
from moelab.config import to_dict
from moelab.data import Batcher, Corpus, load_corpus
from moelab.evaluate import check_evaluable, evaluate
from moelab.logs import MetricsLog, step_row
from moelab.model import MoELM
from moelab.runconfig import RunConfig, TrainConfig
from moelab.signals import Interrupted, StopFlag, stop_on_signals
from moelab.state import TrainerState
from moelab.step import StepResult, lr_at, train_step
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
    ckpt_every: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` writing metrics.jsonl, config.json, checkpoints and summary.json to
    ``out_dir``; returns the summary. ``max_steps`` stops early (the schedule still spans
    ``train.steps``); ``resume`` continues from the latest checkpoint in ``out_dir``, or starts
    fresh when there is none yet (so one command line serves a first run and its restarts).
    ``on_step(step, model)`` runs before every optimizer step. ``ckpt_every`` replaces
    ``train.ckpt_every`` for this call without entering the recorded config (a checkpoint
    changes no number: resume is exact); the lab uses it so that a killed run resumes.

    The run folder is guarded (:mod:`moelab.runfolder`): one writer at a time, a folder holding
    another run is refused unless ``resume`` or ``overwrite``, and a resume must keep the
    checkpoint's config apart from :data:`moelab.runfolder.RESUMABLE` and ``allow_change``.
    SIGINT / SIGTERM save a checkpoint at the step in progress and raise
    :class:`moelab.signals.Interrupted` (:mod:`moelab.signals`)."""
    out = Path(out_dir)
    if max_steps is not None and (isinstance(max_steps, bool) or max_steps < 1):
        raise ValueError(f"--max-steps {max_steps!r} is out of range; allowed: an integer >= 1")
    dev = device.resolve(cfg.train.device)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    world = make_world(cfg.parallel, dev) if multi else LocalWorld()
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
        every = cfg.train.ckpt_every if ckpt_every is None else ckpt_every
        args = (resume, max_steps, progress, on_step, tuple(allow_change), every)
        return _train(cfg, out, world, dev, *args)


def _train(cfg, out, world, dev, resume, max_steps, progress, on_step, allow_change, every):
    """The body of :func:`train`, run while holding the folder's lock."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    corpus = load_corpus(cfg.data)
    check_evaluable(corpus, seq_len=cfg.data.seq_len)  # before any step, not at the end
    st = _build_state(cfg, corpus, world, dev)
    if resume:
        st.restore(out, allow_change)
    else:
        seed_everything(st.cfg.train.seed + 1 + world.rank)
    start, stop = st.step, min(cfg.train.steps, max_steps or cfg.train.steps)
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
        (out / "config.json").write_text(json.dumps(to_dict(st.cfg), indent=2))
    hooks = [h for h in (on_step, _injected_crash()) if h is not None]
    try:
        with stop_on_signals() as flag:
            return _loop(st, _RunIO(corpus, log, out, stop, progress, hooks, flag, every))
    finally:
        log.close()


def _build_state(cfg: RunConfig, corpus: Corpus, world: World, dev: torch.device) -> TrainerState:
    """A fresh trainer state at step 0: the model built on ``dev`` and prepared for ``world``,
    its optimizer, the batcher and one dead-expert tracker per MoE layer."""
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    cfg, model = build_model(cfg, corpus)
    model = world.prepare(model.to(dev), cfg)
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
    opt = make_optimizer(model, cfg.train)
    return TrainerState(cfg, model, opt, batcher, trackers, world, dev, digest=corpus.digest)


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


@dataclass
class _RunIO:
    """What the loop writes to and listens to, besides the trainer state: the corpus (for
    evaluation), the metrics log, the run folder, the step to stop at, the progress bar
    switch, the step hooks, the stop-signal flag and the checkpoint cadence."""

    corpus: Corpus
    log: MetricsLog
    out: Path
    stop: int
    progress: bool
    hooks: list[StepHook]
    flag: StopFlag
    ckpt_every: int


def _loop(st: TrainerState, io: _RunIO) -> dict[str, Any]:
    """Train ``st`` from ``st.step`` to ``io.stop``: one optimizer step, its row, evaluation
    and checkpoint when due; a stop signal saves the step and raises ``Interrupted``."""
    cfg, world, start = st.cfg, st.world, st.step
    tokens_per_step = (
        cfg.train.batch_size
        * cfg.data.seq_len
        * (world.dp_size if cfg.parallel.batch == "per_rank" else 1)
    )
    bar = _progress(start, io.stop, io.progress and world.is_main)
    t0, last_eval = time.perf_counter(), {}
    while st.step < io.stop:
        step, done = st.step, st.step + 1
        batch = st.batcher.batch_at(
            step if cfg.parallel.batch == "global" else step * world.dp_size + world.dp_rank
        )
        st.batcher.step = done
        for hook in io.hooks:
            hook(done, st.model)
        logged = done % cfg.train.log_every == 0 or done == 1 or done == io.stop
        gap = cfg.train.train_eval_gap and logged
        micro = _micro_batches(batch, cfg, world)
        r = train_step(st.model, st.opt, micro, cfg, world, step, measure_gap=gap)
        st.step = done
        _track(st, r, io.log)
        if not r.skipped and logged:
            tok_s = tokens_per_step * (done - start) / (time.perf_counter() - t0)
            row = _row(st, r, tokens_per_step, tok_s)
            io.log.write(row)
            bar.set_postfix(loss=f"{r.loss:.3f}", maxvio=f"{row.get('maxvio_batch', 0):.2f}")
        if _due(done, cfg.train.eval_every, io.stop):
            last_eval = _evaluate(st, io.corpus)
            io.log.write({"step": done, **last_eval})
        saved = _due(done, io.ckpt_every, io.stop)
        if saved:
            st.save(io.out)
        bar.update(1)
        if done < io.stop and _stop_requested(io.flag, world):
            if not saved:
                st.save(io.out)
            bar.close()
            raise Interrupted(io.flag.signum or signal.SIGTERM, done, io.out)
    bar.close()
    return _summary(st, io, last_eval, tokens_per_step, time.perf_counter() - t0)


def _track(st: TrainerState, r: StepResult, log: MetricsLog) -> None:
    """A skipped step's row, or the step's counts into the dead-expert trackers (one copy of
    every layer's counts to the host)."""
    if r.skipped:
        log.write({"step": st.step, "skipped": True, "nonfinite": r.nonfinite})
        return
    if st.trackers:
        counts_LE = host.to_cpu(torch.stack(r.step_counts()), "step counts")
        for tr, c in zip(st.trackers, counts_LE, strict=True):
            tr.update(c)


def _row(st: TrainerState, r: StepResult, tokens_per_step: int, tok_s: float) -> dict:
    """The logged row of the step just done (the one place per-layer values reach the host)."""
    done = st.step
    lr = lr_at(done - 1, st.cfg.train)
    row = step_row(done, r, st.model, st.trackers, lr, tokens_per_step * done, tok_s)
    return row | st.world.extra_stats(r, st.model)


def _evaluate(st: TrainerState, corpus: Corpus) -> dict[str, Any]:
    return evaluate(
        st.model,
        corpus,
        batch_size=st.cfg.train.batch_size,
        seq_len=st.cfg.data.seq_len,
        max_tokens=st.cfg.train.eval_max_tokens,
        world=st.world,
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


def _summary(st: TrainerState, io: _RunIO, last_eval: dict, tokens_per_step: int, elapsed):
    """summary.json (rank 0 writes it): steps, tokens, parameters, seconds, the device the
    run computed on, and the last evaluation."""
    params = st.model.count_params()
    summary = {
        "steps": io.stop,
        "tokens": tokens_per_step * io.stop,
        "params": params["total"],
        "active_params": params["active"],
        "seconds": elapsed,
        "device": str(st.device),
        **last_eval,
    }
    if st.world.is_main:
        (Path(io.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _restore(out, cfg, model, opt, batcher, trackers, world, digest=None, allow_change=()) -> int:
    """Load the latest checkpoint of ``out`` into these objects; returns its step (the
    :meth:`TrainerState.restore` of a state made of them, for callers that hold the parts)."""
    st = TrainerState(cfg, model, opt, batcher, trackers, world, device.of(model), digest=digest)
    st.restore(Path(out), tuple(allow_change))
    return st.step
