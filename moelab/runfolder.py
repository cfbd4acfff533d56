"""The run folder a training run writes: who may write it, what a new run may replace, and
what a resumed run may change.

Guarantees (docs/reliability.md):

- **One writer.** ``lock(out)`` holds ``OUT/train.lock`` (the holder's PID, host and, on
  Linux, the boot and start time of that PID) for the whole run; a second ``moelab train`` on
  the folder is refused naming the holder. A lock left by a process that no longer runs on this
  host is stale and taken over with a note; so is one whose PID now names another process (a
  reboot or a new container restarts PIDs, so an old lock's PID may be alive and unrelated).
- **Nothing replaced by accident.** A folder that holds a run (a config, metrics, a summary or a
  checkpoint) is refused for a new run unless it is resumed or ``overwrite`` is asked for; an
  overwrite removes the old run's checkpoints first, so none of them is later resumed by mistake.
- **Resume means the same run.** ``check_resume`` compares the whole resolved config saved in
  the checkpoint with the current one and refuses any difference outside :data:`RESUMABLE` and
  the keys the user names (``--allow-change``); the data digest must match too.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moelab.checkpoint import POINTER, CheckpointError
from moelab.errors import RunError

LOCK = "train.lock"
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", POINTER)

# Settings a resumed run may change without a word: how long it runs (train.steps; the cosine
# schedule then spans the new length, as ``--max-steps`` beyond the schedule always did), what
# and how often it logs, evaluates and checkpoints, threads, the non-finite policy and the
# expert-parallel layout (checkpoints hold the single-process layout). Everything else (data,
# tokenizer, model, lr and its schedule shape, batch, seed, dtype, balancing) is the run itself.
RESUMABLE = frozenset(
    {
        "train.steps",
        "train.log_every",
        "train.eval_every",
        "train.eval_max_tokens",
        "train.ckpt_every",
        "train.keep_checkpoints",
        "train.threads",
        "train.device",
        "train.tensorboard",
        "train.train_eval_gap",
        "train.nonfinite",
        "data.cache_dir",
        "parallel.ep",
        "parallel.timeout_s",
    }
)


# ----------------------------------------------------------------------------- folder checks


def check_writable(out: Path, what: str = "the run folder ") -> None:
    """Fail before any work if the folder ``out`` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"cannot write to {what}{str(out)!r} ({exc.strerror or exc}); give a writable --out"
        ) from exc


def check_output_folder(
    out: str | Path,
    command: str,
    own: tuple[str, ...],
    *,
    keep: tuple[str | Path, ...] = (),
    create: bool = True,
) -> Path:
    """Before any work: make sure ``moelab COMMAND --out OUT`` may write ``out``.

    ``out`` must be creatable and writable, and may not hold anything but what ``command``
    itself writes (``own``: glob patterns of its file names; dot-files and the paths in
    ``keep`` are ignored): a run folder, a model folder or any other foreign folder is
    refused with one ``ValueError`` naming the first foreign file, so its files are never
    overwritten. A folder holding an earlier output of the same command is reused.
    ``create=False`` checks an existing folder's files only (nothing is created)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder; choose another --out")
    kept = {Path(k).resolve() for k in keep}
    foreign = sorted(
        p.name
        for p in (out.iterdir() if out.is_dir() else ())
        if not p.name.startswith(".")
        and p.resolve() not in kept
        and not (p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in own))
    )
    if foreign:
        markers = (*RUN_FILES[1:], LOCK)  # config.json alone may be any program's
        run = [n for n in foreign if n in markers or fnmatch.fnmatch(n, "ckpt-*.pt")]
        what = "a training run" if run else "other files"
        raise ValueError(
            f"--out {str(out)!r} holds {what} ({', '.join(foreign[:3])}) that `moelab "
            f"{command}` would overwrite or mix with; choose an empty or new --out"
        )
    if not create:
        return out
    check_writable(out, "")
    return out


# What ``save_pretrained`` writes for a model and its tokenizer (export, finetune).
HF_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.*",
)


def check_model_folder(out: str | Path, command: str, own: tuple[str, ...] = ()) -> Path:
    """:func:`check_output_folder` for a ``save_pretrained`` output: only model, tokenizer and
    ``own`` files, and a ``config.json`` there must be a transformers config (a moelab run's
    config.json is never overwritten)."""
    out = check_output_folder(out, command, HF_MODEL_FILES + own)
    config = out / "config.json"
    if config.is_file():
        try:
            hf = "model_type" in json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            hf = False
        if not hf:
            raise ValueError(
                f"--out {str(out)!r} holds a config.json that is not a transformers model's "
                f"(a moelab run's?); `moelab {command}` would overwrite it; choose another --out"
            )
    return out


def check_world(ep: int, world_size: int) -> None:
    """Refuse ``parallel.ep > 1`` in a single process: it would be recorded in the run's
    config but ignored (expert parallelism needs ``torchrun`` with ep ranks or more)."""
    if ep > 1 and world_size == 1:
        raise ValueError(
            f"parallel.ep={ep} needs {ep} or more processes under torchrun (this is a single "
            f"process); run `torchrun --nproc-per-node {ep} -m moelab train ...` or set "
            "parallel.ep=1"
        )


def run_files(out: Path) -> list[str]:
    """Names of the files in ``out`` that belong to a training run (empty: a free folder)."""
    if not out.is_dir():
        return []
    names = [n for n in RUN_FILES if (out / n).exists()]
    return names + sorted(p.name for p in out.glob("ckpt-*.pt"))


def check_new_run(out: Path, *, overwrite: bool) -> None:
    """Refuse to start a new run in a folder holding another, unless ``overwrite``; with it,
    remove the old run's checkpoints and summary (its config and metrics are rewritten)."""
    found = run_files(out)
    if not found:
        return
    if not overwrite:
        raise ValueError(
            f"run folder {str(out)!r} already holds a run ({', '.join(found[:3])}); pass "
            "--resume to continue it, --overwrite to replace it, or choose another --out"
        )
    for name in found:
        if name.startswith("ckpt-") or name in (POINTER, "summary.json"):
            (out / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the lock


def _holder(path: Path) -> dict[str, Any] | None:
    """The lock's ``{"pid", "host"}``, or None when it is unreadable (a torn write)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("pid"), int)
    return data if ok else None


def _started(pid: int) -> str | None:
    """``"BOOT_ID:START"`` naming one process for good (Linux: the kernel's boot id and the
    PID's start time in clock ticks, field 22 of /proc/PID/stat); None where unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # after the command name "(...)"


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder may still run: always on another host (it cannot be asked); on this
    host while its PID runs and, where the lock records it, is the same process."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    recorded, now = holder.get("started"), _started(holder["pid"])
    return recorded is None or now is None or recorded == now


def in_use(out: Path) -> bool:
    """Whether a live process (or one on another host) holds ``OUT/train.lock``."""
    holder = _holder(out / LOCK)
    return holder is not None and _alive(holder)


def _try_link(path: Path, payload: str) -> bool:
    """Create ``path`` holding ``payload`` atomically; False if it already exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(payload)
    try:
        os.link(tmp, path)  # fails if path exists; readers never see a half-written lock
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def acquire(out: Path) -> Path:
    """Take ``OUT/train.lock`` for this process; raise RunError naming a live holder."""
    path = out / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _started(os.getpid())}
    for _ in range(3):
        if _try_link(path, json.dumps(me)):
            return path
        holder = _holder(path)
        if holder is not None and _alive(holder):
            raise RunError(
                f"run folder {str(out)!r} is in use by process {holder['pid']} on "
                f"{holder.get('host')!r} ({LOCK}); wait for it, or remove {str(path)!r} if "
                "that process no longer runs"
            )
        who = f"process {holder['pid']}" if holder else "an unreadable holder"
        print(f"moelab: taking over the stale lock {str(path)!r} of {who}", file=sys.stderr)
        path.unlink(missing_ok=True)
    raise RunError(f"cannot take the lock {str(path)!r}: other processes keep taking it")


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = _holder(path)
    if holder is not None and holder["pid"] == os.getpid():
        path.unlink(missing_ok=True)


@contextmanager
def lock(out: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold ``OUT/train.lock`` while the body runs (``enabled=False``: a non-main rank)."""
    path = acquire(out) if enabled else None
    try:
        yield
    finally:
        if path is not None:
            release(path)


# ----------------------------------------------------------------------------- resume


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat(value, name + ".")
        else:
            out[name] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose value differs between two resolved config dicts. A key the saved
    config lacks (a setting added to moelab since) is not a change."""
    a, b = _flat(saved), _flat(current)
    return sorted(k for k in a.keys() | b.keys() if k in a and a.get(k) != b.get(k))


def _absolute_paths(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with its data paths absolute, as new configs store them (a run saved
    with relative paths read them relative to the working directory, as a resume does)."""
    from moelab.data import absolute_path

    data = saved.get("data")
    if not isinstance(data, dict):
        return saved
    data = dict(data)
    if isinstance(data.get("sources"), list):
        data["sources"] = [absolute_path(s) if isinstance(s, str) else s for s in data["sources"]]
    if isinstance(data.get("cache_dir"), str):
        data["cache_dir"] = absolute_path(data["cache_dir"])
    return {**saved, "data": data}


def check_resume(
    out: Path,
    saved: dict[str, Any],
    current: dict[str, Any],
    *,
    allow: tuple[str, ...] = (),
) -> None:
    """Refuse to resume ``out`` with a config that differs from the checkpoint's beyond
    :data:`RESUMABLE` and ``allow``; the message names each setting, old and new value."""
    unknown = [k for k in allow if k not in _flat(current)]
    if unknown:
        raise ValueError(f"--allow-change {unknown[0]!r}: no such setting; e.g. train.lr")
    saved = _absolute_paths(saved)
    a, b = _flat(saved), _flat(current)
    changed = [k for k in config_changes(saved, current) if k not in RESUMABLE and k not in allow]
    if not changed:
        return
    what = "model" if any(k.startswith("model.") for k in changed) else "run"
    diffs = "; ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:4])
    raise CheckpointError(
        f"checkpoint in {str(out)!r} was written for another {what} config ({diffs}); resume "
        "with the same settings, name a safe change with --allow-change KEY, or start a new --out"
    )


def check_data(out: Path, saved_digest: str | None, digest: str) -> None:
    """Refuse to resume on other data or another tokenizer than the checkpoint was trained on
    (a checkpoint from before data digests were recorded is not checked)."""
    if saved_digest and saved_digest != digest:
        raise CheckpointError(
            f"checkpoint in {str(out)!r} was trained on other data or another tokenizer (data "
            "digest differs); resume with the same --data and data settings, or start a new --out"
        )
