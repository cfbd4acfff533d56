"""Train an experiment's variants through ``moelab.train.train`` and collect their numbers.

Runs are cached by the hash of their resolved config under ``runs/lab/cache/`` so that a
variant shared by several experiments (e.g. the loss-free model of experiments 1, 3 and 4)
trains once. ``snapshots=N`` trains in N segments (``max_steps`` + ``resume``) and routes a
fixed validation stream after each, for routing fluctuation and saturation. Each run folder
records the numerics fingerprint of the code that trained it (``fingerprint.json``, see
``moelab.lab.fingerprint``) and the hash of its sources (``code.txt``, for the record); a cached
run whose fingerprint differs from today's code is moved aside and retrained.

The cache is local and large (checkpoints). ``RECORDS`` (``results/runs/``, committed) keeps
each finished decisive run's *record*: its config, summary, fingerprint, code hash and
training log, no checkpoint. A run missing from the cache is restored from its record, so a
clean clone re-analyses the committed runs and trains only the rest; an analysis that needs a
run's weights (:func:`moelab.lab.analysis.needs_weights`) retrains a run that has only its record.

Legend: B sequences, L sequence length, T tokens, K slots per token, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moelab import checkpoint, metrics, signals
from moelab.config import to_dict
from moelab.errors import RunError
from moelab.inspect import load_trained
from moelab.lab import fingerprint, stats
from moelab.lab.spec import build_arm_config
from moelab.logs import read_rows
from moelab.runconfig import RunConfig
from moelab.runfolder import in_use
from moelab.train import train

CACHE = Path("runs/lab/cache")
RECORDS = Path("results/runs")  # committed: records of finished decisive runs (no checkpoint)
RECORD_FILES = ("config.json", "summary.json", "fingerprint.json", "code.txt")


def run_key(cfg: RunConfig, snapshots: int, nproc: int = 1) -> str:
    """sha256 (16 hex digits) of the config's non-default fields, the snapshot count and the
    process count: a config field added later with a default leaves every key as it was. A
    changed default could make one key name two configs, so a hit also compares the run's
    config.json with ``cfg`` (:func:`same_config`)."""
    parts = [non_default(cfg), snapshots] + ([nproc] if nproc > 1 else [])
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def non_default(obj: Any) -> Any:
    """A dataclass config as a nested dict of the fields that differ from their defaults."""
    if not dataclasses.is_dataclass(obj):
        return list(obj) if isinstance(obj, tuple) else obj
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING  # a required field: always part of the key
        if default is dataclasses.MISSING or value != default:
            out[f.name] = non_default(value)
    return out


def same_config(out: Path, cfg: RunConfig) -> bool:
    """The run in ``out`` was trained with ``cfg`` (its config.json read by today's code; the
    vocabulary size the trainer fills in from the tokenizer counts as equal)."""
    try:
        old = to_dict(build_arm_config(json.loads((out / "config.json").read_text())))
    except (OSError, ValueError):
        return False
    new = to_dict(cfg)
    if not new["model"].get("vocab_size"):
        new["model"]["vocab_size"] = old["model"].get("vocab_size")
    return old == new


def rekey_cache(cache: Path | None = None) -> list[tuple[str, str]]:
    """Rename finished single-process, unsegmented run folders whose name is not today's key
    of their config.json (runs keyed by an earlier scheme); returns (old, new) names."""
    cache = cache or CACHE
    moved = []
    for out in sorted(p for p in cache.glob("*") if p.is_dir() and "." not in p.name):
        if not (out / "summary.json").exists() or (out / "snapshots.pt").exists():
            continue
        rows = read_rows(out / "metrics.jsonl")
        if any(r.get("world_size", 1) > 1 for r in rows):
            continue
        data = json.loads((out / "config.json").read_text())
        data["model"]["vocab_size"] = 0  # filled in by the trainer; lab configs leave it unset
        key = run_key(build_arm_config(data), 0)
        if key != out.name and not (cache / key).exists():
            out.rename(cache / key)
            moved.append((out.name, key))
    return moved


# Files that only analyse or present finished runs: editing them does not make a run stale.
_PRESENTATION = {"cli.py", "demo.py", "plots.py", "report.py", "runs.py", "__main__.py"}


@functools.cache
def code_hash() -> str:
    """sha256 (12 hex digits) of the moelab sources that decide what a run computes: the
    package's top-level modules (minus ``_PRESENTATION``) and this runner (snapshots)."""
    root = Path(__file__).resolve().parents[1]
    files = [p for p in sorted(root.glob("*.py")) if p.name not in _PRESENTATION]
    h = hashlib.sha256()
    for p in [*files, Path(__file__).resolve()]:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:12]


def is_stale(out: Path) -> bool:
    """Whether the run in ``out`` was trained by code whose numerics fingerprint differs from
    today's (or is unrecorded): such a run is retrained, never used for a verdict."""
    return not fingerprint.matches(fingerprint.read(out), fingerprint.current())


def run_folder(
    cfg: RunConfig, snapshots: int = 0, cache: Path | None = None, nproc: int = 1
) -> Path:
    """The cache folder of ``cfg``, restored from its record (:func:`restore_record`) when the
    cache has none."""
    out = (cache or CACHE) / run_key(cfg, snapshots, nproc)
    if not out.exists() and not snapshots:
        restore_record(out)
    return out


def keep_record(out: Path, records: Path | None = None) -> Path | None:
    """Copy the record of the finished run in ``out`` to ``records/<folder name>`` (default
    :data:`RECORDS`): :data:`RECORD_FILES` and the training log gzipped (``metrics.jsonl.gz``);
    no checkpoint. Runs with routing snapshots are not recorded (their analysis needs
    snapshots.pt). Returns the record's folder, or None when nothing was recorded."""
    rec = (records or RECORDS) / out.name
    if not finished(out) or (out / "snapshots.pt").exists() or not (out / "code.txt").exists():
        return None
    if (rec / "summary.json").exists() and (rec / "summary.json").read_bytes() == (
        out / "summary.json"
    ).read_bytes():
        return rec  # already recorded
    tmp = rec.with_name(f"{rec.name}.partial-{os.getpid()}")  # two lanes may record one run
    tmp.mkdir(parents=True)
    for name in RECORD_FILES:
        shutil.copy2(out / name, tmp / name)
    with gzip.GzipFile(tmp / "metrics.jsonl.gz", "wb", mtime=0) as f:  # mtime 0: same bytes
        f.write((out / "metrics.jsonl").read_bytes())
    shutil.rmtree(rec, ignore_errors=True)
    _move_or_drop(tmp, rec)
    return rec


def _move_or_drop(tmp: Path, dest: Path) -> None:
    """Rename the folder ``tmp`` to ``dest``; if another process made ``dest`` first, keep
    theirs (the same files) and delete ``tmp``."""
    try:
        tmp.rename(dest)
    except OSError:
        if not dest.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def restore_record(out: Path, records: Path | None = None) -> bool:
    """Recreate the cache folder ``out`` from its record, if one exists (see
    :func:`keep_record`); a record written by other numerics restores as a stale run, which
    is retrained as usual. Returns whether a record was restored."""
    rec = (records or RECORDS) / out.name
    if out.exists() or not all((rec / n).is_file() for n in (*RECORD_FILES, "metrics.jsonl.gz")):
        return False
    tmp = out.with_name(f"{out.name}.restoring-{os.getpid()}")
    tmp.mkdir(parents=True)
    for name in RECORD_FILES:
        shutil.copy2(rec / name, tmp / name)
    (tmp / "metrics.jsonl").write_bytes(gzip.decompress((rec / "metrics.jsonl.gz").read_bytes()))
    _move_or_drop(tmp, out)
    return True


def has_weights(out: Path) -> bool:
    """``out`` holds a checkpoint (a run restored from its record has none)."""
    return checkpoint.latest(out) is not None


def is_cached(
    cfg: RunConfig,
    snapshots: int = 0,
    cache: Path | None = None,
    nproc: int = 1,
    weights: bool = False,
) -> bool:
    """A finished run of ``cfg`` exists and was trained by code that computes today's numbers
    (with ``weights``: and its checkpoint is there, not only its record)."""
    return _reusable(run_folder(cfg, snapshots, cache, nproc), cfg, snapshots, weights)


def _reusable(out: Path, cfg: RunConfig, snapshots: int, weights: bool) -> bool:
    """:func:`is_cached` of the run folder ``out``."""
    return (
        is_done(out, snapshots)
        and not is_stale(out)
        and same_config(out, cfg)
        and (not weights or has_weights(out))
    )


def is_done(out: Path, snapshots: int = 0) -> bool:
    """``out`` holds a finished run (and its routing snapshots, where it takes any)."""
    return finished(out) and (not snapshots or (out / "snapshots.pt").exists())


def finished(out: Path) -> bool:
    """Whether ``out`` holds a run trained to its config's last step with no partial routing
    snapshots left: a snapshotted run writes summary.json after each segment and keeps
    ``snapshots.partial.pt`` until the last. Needs no experiment, so it serves folders a
    device run sends back; :func:`is_done` adds the check for ``snapshots.pt``."""
    try:
        steps = json.loads((out / "config.json").read_text())["train"]["steps"]
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError, KeyError):
        return False
    return summary.get("steps") == steps and not (out / "snapshots.partial.pt").exists()


def run_state(
    cfg: RunConfig,
    snapshots: int = 0,
    cache: Path | None = None,
    nproc: int = 1,
    weights: bool = False,
) -> str:
    """What the cache holds for ``cfg`` (one of ``moelab.lab.RUN_STATES``): ``done`` (what
    :func:`is_cached` reuses), ``training`` (a live process holds its lock), ``resumable``
    (:func:`is_resumable`), ``stale`` (:func:`has_stale`: retrained) or ``to train``."""
    out = run_folder(cfg, snapshots, cache, nproc)
    if _reusable(out, cfg, snapshots, weights):
        return "done"
    if in_use(out):
        return "training"
    if is_resumable(out, cfg, snapshots, nproc):
        return "resumable"
    return "stale" if is_done(out, snapshots) and is_stale(out) else "to train"


def has_stale(
    cfg: RunConfig, snapshots: int = 0, cache: Path | None = None, nproc: int = 1
) -> bool:
    """A finished run of ``cfg`` exists but was trained by code with another fingerprint."""
    out = run_folder(cfg, snapshots, cache, nproc)
    return is_done(out, snapshots) and is_stale(out)


class TrainingElsewhere(RunError):
    """A run's cache folder is locked by a live process (another ``lab run``): left to it."""


def train_cached(
    cfg: RunConfig,
    *,
    snapshots: int = 0,
    cache: Path | None = None,
    nproc: int = 1,
    weights: bool = False,
    record: bool = False,
) -> Path:
    """Train ``cfg`` unless an identical finished run with today's fingerprint exists; returns
    the run folder. An unfinished run of the same config (in one process or under torchrun),
    started by code with today's fingerprint, resumes from its latest checkpoint (exact
    resume: the same numbers as one uninterrupted run); any other folder there is moved aside
    and retrained. A folder another live process trains raises :class:`TrainingElsewhere`
    and is left untouched (two lanes may share variants).

    ``nproc`` > 1 trains under torchrun with that many processes (``parallel`` decides the
    layout, e.g. ``parallel.batch = "per_rank"``: more ranks, larger computation batch).
    ``weights``: the caller needs the trained model, so a run restored from its record only
    (no checkpoint) is retrained. ``record``: keep the finished run's record
    (:func:`keep_record`; the lab does at the decisive size)."""
    out = _train_cached(cfg, snapshots, cache, nproc, weights)
    if record:
        keep_record(out)
    return out


def _train_cached(
    cfg: RunConfig, snapshots: int, cache: Path | None, nproc: int, weights: bool
) -> Path:
    out = run_folder(cfg, snapshots, cache, nproc)
    if _reusable(out, cfg, snapshots, weights):
        return out
    if in_use(out):  # another lab process trains it: neither resume nor move it aside
        raise TrainingElsewhere(f"{out} is being trained by another process (train.lock)")
    fp = fingerprint.current()  # before training: the code that trains is today's code
    resume = is_resumable(out, cfg, snapshots, nproc)
    if resume:
        print(f"[lab] {out}: unfinished run of today's numerics; resuming it")
    elif out.exists():
        old = out.with_name(out.name + f".stale-{time.strftime('%Y%m%d-%H%M%S')}")
        why = "other numerics fingerprint, unfinished or a record without weights"
        print(f"[lab] {out}: {why}; kept as {old.name}")
        out.rename(old)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint.write(out, fp)  # first, so that a run cut off later can resume
    _train(cfg, out, snapshots, nproc, resume)
    (out / "code.txt").write_text(code_hash() + "\n")
    checkpoint.keep_latest_only(out)
    return out


def is_resumable(out: Path, cfg: RunConfig, snapshots: int = 0, nproc: int = 1) -> bool:
    """``out`` holds an unfinished run of ``cfg`` whose recorded fingerprint (written when it
    started) matches today's code: it can continue instead of restarting (under torchrun in
    the same layout too: tests/test_parallel.py resumes EP=2 bit for bit)."""
    return (
        out.is_dir()
        and not is_done(out, snapshots)
        and checkpoint.latest(out) is not None
        and same_config(out, cfg)
        and not is_stale(out)
    )


LAB_CKPT_EVERY = 100  # steps between checkpoints of a lab run whose config sets none


def _ckpt_every(cfg: RunConfig) -> int:
    """A lab run checkpoints every :data:`LAB_CKPT_EVERY` steps unless its config says how
    often (outside the config, so the run's cache key stays): a run killed outright (a
    session's end) resumes from there instead of starting over."""
    return cfg.train.ckpt_every or LAB_CKPT_EVERY


def _train(cfg: RunConfig, out: Path, snapshots: int, nproc: int, resume: bool = False) -> None:
    """Train ``cfg`` into ``out``: under torchrun, in one go, or in ``snapshots`` segments;
    ``resume`` continues an unfinished run from its latest checkpoint."""
    if nproc > 1:
        if snapshots:
            raise ValueError("lab: snapshots are not supported for torchrun (nproc > 1) runs")
        torchrun_train(cfg, out, nproc, resume)
    elif not snapshots:
        train(cfg, out, resume=resume, progress=False, ckpt_every=_ckpt_every(cfg))
    else:
        _train_segments(cfg, out, _snapshot_steps(cfg.train.steps, snapshots), resume)


def _train_segments(cfg: RunConfig, out: Path, steps: list[int], resume: bool) -> None:
    """Train up to each step of ``steps`` in turn and route the validation stream after each;
    writes ``snapshots.pt``. The snapshots so far are kept in ``snapshots.partial.pt`` after
    every segment, so that a resumed run skips the segments it has routed already."""
    partial = out / "snapshots.partial.pt"
    snaps = torch.load(partial)["experts"] if resume and partial.exists() else []
    every = _ckpt_every(cfg)
    for i, stop in enumerate(steps):
        if i < len(snaps):
            continue
        train(cfg, out, resume=resume or i > 0, max_steps=stop, progress=False, ckpt_every=every)
        run = load_trained(out)
        snaps.append([e for e, _ in route_stream(run.model, val_stream(run.corpus, cfg))])
        torch.save({"steps": steps[: len(snaps)], "experts": snaps}, partial)
    torch.save({"steps": steps, "experts": snaps}, out / "snapshots.pt")
    partial.unlink()


def torchrun_train(cfg: RunConfig, out: Path, nproc: int, resume: bool = False) -> None:
    """``torchrun --standalone --nproc-per-node nproc -m moelab train`` on ``cfg`` (passed as
    the resolved config.json), checkpointing every :data:`LAB_CKPT_EVERY` steps; ``resume``
    continues from the latest checkpoint. A stop that a pool worker deferred
    (:func:`moelab.signals.stop_pending`) is forwarded once as SIGTERM: torchrun passes it
    on, the ranks save and stop together. A failed launch raises with the end of its output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg_file = out.parent / f"{out.name}.config.json"
    cfg_file.write_text(json.dumps(to_dict(cfg), indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "moelab", "train", "--config", str(cfg_file),
           "--out", str(out), "--quiet", "--ckpt-every", str(_ckpt_every(cfg)),
           *(["--resume"] if resume else [])]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, forwarded = "", False
    while True:
        try:
            output, _ = proc.communicate(timeout=1.0)  # a retry loses no output
            break
        except subprocess.TimeoutExpired:
            if not forwarded and signals.stop_pending() is not None:
                proc.send_signal(signal.SIGTERM)
                forwarded = True
    if proc.returncode != 0:
        why = "was stopped (the next lab run resumes it)" if forwarded else "failed"
        raise RuntimeError(f"lab: torchrun with {nproc} processes {why}:\n{output[-2000:]}")


def _snapshot_steps(total: int, n: int) -> list[int]:
    return sorted({max(1, round(total * (i + 1) / n)) for i in range(n)})


def val_stream(corpus, cfg: RunConfig, *, max_seqs: int = 0, seed: int = 0) -> Tensor:
    """(B, L) validation sequences of the training domains, interleaved by a fixed shuffle.

    ``max_seqs`` caps B (0 = ``lab_val_tokens`` worth: 32768 tokens).
    """
    L = cfg.data.seq_len
    seqs = []
    for name in corpus.domains:
        if name in corpus.holdout:
            continue
        ids = corpus.val[name].astype(np.int64)
        n = (len(ids) - 1) // L
        seqs.append(ids[: n * L].reshape(n, L))
    x = np.concatenate(seqs)
    x = x[np.random.default_rng(seed).permutation(len(x))]
    cap = max_seqs or max(1, 32768 // L)
    return torch.from_numpy(x[:cap])


@torch.no_grad()
def route_stream(
    model, tokens_BL: Tensor, *, batch: int = 16
) -> list[tuple[Tensor, Tensor | None]]:
    """Per MoE layer ``(experts (T, K), slot mask (T, K) or None)`` over the stream, in order."""
    per_layer: list[list[tuple[Tensor, Tensor | None]]] = []
    for i in range(0, len(tokens_BL), batch):
        out = model(tokens_BL[i : i + batch])
        for j, o in enumerate(out.moe):
            if len(per_layer) <= j:
                per_layer.append([])
            per_layer[j].append((o.experts, o.slot_mask))
    result = []
    for parts in per_layer:
        experts = torch.cat([e for e, _ in parts])
        masks = [m for _, m in parts]
        result.append((experts, None if masks[0] is None else torch.cat(masks)))
    return result


# ----------------------------------------------------------------------------- numbers


def collect(run_dir: Path) -> dict[str, Any]:
    """Scalar numbers and curves of one finished run (summary, eval row and training log)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_rows(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    counts_lE = torch.tensor(evals[-1]["counts_layers"], dtype=torch.float64) if evals else None
    tail = train_rows[-max(1, len(train_rows) // 4) :]
    num = {
        k: summary.get(k)
        for k in ("val_loss", "maxvio_global", "maxvio_seq", "mi", "tokens", "steps")
    }
    num |= {
        # From the logged throughput: summary["seconds"] covers only the last resumed segment.
        "seconds_per_step": _seconds_per_step(summary, train_rows),
        "maxvio_batch_tail": _mean(r.get("maxvio_batch") for r in tail),
        "maxvio_step_tail": _mean(r.get("maxvio_step") for r in tail),
        "maxvio_batch_first200": _mean(
            r.get("maxvio_batch") for r in train_rows if r["step"] <= 200
        ),
        "experts_per_token": _mean(
            sum(r["experts_per_token_layers"]) / len(r["experts_per_token_layers"])
            for r in tail
            if r.get("experts_per_token_layers")
        ),
        "drop_rate": _mean(r.get("drop_rate") for r in train_rows[1:]),
        "dead_window": _last(train_rows, "dead_window_layers"),
        "dead_train_batch": _last(train_rows, "dead_layers"),
        "spikes": count_spikes([r["loss"] for r in train_rows]),
        "spiked": float(count_spikes([r["loss"] for r in train_rows]) > 0),  # 0/1 per run
        "max_z": max((max(r.get("z_layers") or [0]) for r in train_rows), default=0.0),
    }
    if any("train_eval_gap" in r for r in train_rows):  # early: the first fifth of training
        early = train_rows[: max(1, len(train_rows) // 5)]
        num["train_eval_gap_early"] = _mean(r.get("train_eval_gap") for r in early)
        num["train_eval_gap_tail"] = _mean(r.get("train_eval_gap") for r in tail)
    if counts_lE is not None:
        num |= {
            "dead_val": int(metrics.dead_experts(counts_lE).sum()),
            "max_over_mean": float(metrics.max_over_mean(counts_lE).mean()),
            "cv": float(metrics.cv(counts_lE).mean()),
        }
    for key, value in summary.items():
        if key.startswith("val_loss/"):
            num[key.replace("/", ":")] = value
    return num


def computation_batch_tokens(cfg: RunConfig, world_size: int = 1) -> int:
    """Tokens routed together in one training forward: sequences per micro-batch on a rank ×
    sequence length × ranks (``parallel.batch = "global"`` splits the batch over the ranks)."""
    local = cfg.train.batch_size // (1 if cfg.parallel.batch == "per_rank" else world_size)
    return (cfg.train.micro_batch_size or local) * cfg.data.seq_len * world_size


def run_computation_batch(run_dir: Path) -> int:
    """:func:`computation_batch_tokens` of a finished run (its config.json and the logged
    ``world_size``; 1 without torchrun)."""
    cfg = build_arm_config(json.loads((run_dir / "config.json").read_text()))
    rows = read_rows(run_dir / "metrics.jsonl")
    return computation_batch_tokens(
        cfg, next((r["world_size"] for r in rows if "world_size" in r), 1)
    )


def _seconds_per_step(summary: dict[str, Any], rows: list[dict]) -> float:
    tps = sorted(r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))
    if not tps:
        return summary["seconds"] / max(1, summary["steps"])
    return summary["tokens"] / max(1, summary["steps"]) / tps[len(tps) // 2]


def curves(run_dir: Path) -> dict[str, list]:
    rows = [r for r in read_rows(run_dir / "metrics.jsonl") if "loss" in r]
    return {
        "step": [r["step"] for r in rows],
        "loss": [r["loss"] for r in rows],
        "maxvio_batch": [r.get("maxvio_batch", 0.0) for r in rows],
        "dead": [sum(r.get("dead_window_layers", [])) for r in rows],
        "drop_rate": [r.get("drop_rate", 0.0) for r in rows],
    }


def count_spikes(losses: list[float], *, ratio: float = 1.2, skip: int = 3) -> int:
    """Loss spikes: logged losses above ``ratio`` × the running minimum (after ``skip`` rows)."""
    best, n = math.inf, 0
    for i, v in enumerate(losses):
        if not math.isfinite(v):
            n += 1
            continue
        if i >= skip and v > ratio * best:
            n += 1
        best = min(best, v)
    return n


def _mean(values) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    return sum(vals) / len(vals) if vals else None


def _last(rows: list[dict], key: str) -> int | None:
    for r in reversed(rows):
        if key in r:
            return int(sum(r[key]))
    return None


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Every numeric key over seeds: ``mean``, sample ``std`` (ddof=1), ``n`` and the per-seed
    ``values`` in seed order (``moelab.lab.stats.summarize``)."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        vals = [s.get(key) for s in per_seed]
        vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if vals:
            out[key] = stats.summarize(vals)
    return out
