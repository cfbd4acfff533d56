"""Crash-safe checkpoints: write to a temporary file, fsync, rename, then move a pointer.

Layout of a run folder::

    ckpt-000200.pt     one complete checkpoint (torch.save of a dict)
    latest.json        {"file": "ckpt-000200.pt", "step": 200, "sha256": "..."}

A save that dies at any point leaves the previous ``latest.json`` and the file it names
intact (OLMo-core / Megatron practice). Stale ``*.tmp`` files and checkpoint files newer than
the pointer (written by a save that died before moving it) are removed at the next save.
Loading checks the SHA-256 in the pointer, so a truncated or foreign file gives a one-line
error naming it. A state with a NaN or inf tensor is refused: it never becomes a checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

POINTER = "latest.json"
REQUIRED = ("model", "config", "step")  # keys every moelab checkpoint has


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, with a message saying what to fix."""


def _fsync_write(path: Path, data: bytes) -> None:
    """Write bytes to ``path.tmp``, fsync, rename to ``path`` (atomic on POSIX); a failed
    write removes its ``.tmp``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: str | Path, state: dict[str, Any], step: int, *, keep: int = 2) -> Path:
    """Save ``state`` as checkpoint ``step`` and point ``latest.json`` at it.

    Keeps the newest ``keep`` complete checkpoints. Raises CheckpointError on an unwritable
    folder or a non-finite tensor (the previous checkpoint stays the one that loads).
    """
    folder = Path(folder)
    check_finite(state, step)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.tmp"):
            stale.unlink()
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        name = f"ckpt-{step:06d}.pt"
        _fsync_write(folder / name, data)
        pointer = {"file": name, "step": step, "sha256": hashlib.sha256(data).hexdigest()}
        _fsync_write(folder / POINTER, json.dumps(pointer).encode())
    except OSError as exc:
        raise CheckpointError(f"cannot write a checkpoint in {str(folder)!r}: {exc}") from exc
    _prune(folder, keep, step)
    return folder / name


def check_finite(state: dict[str, Any], step: int) -> None:
    """Raise CheckpointError naming the first NaN/inf tensor of the model or optimizer state."""
    for name, t in _float_tensors(state):
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"refusing to save checkpoint {step}: {name} is not finite (NaN or inf); "
                "the previous checkpoint stays the latest"
            )


def _float_tensors(state: dict[str, Any]):
    """(name, tensor) for every floating tensor in ``state["model"]`` and the optimizer state."""
    for name, t in state.get("model", {}).items():
        if isinstance(t, Tensor) and t.is_floating_point():
            yield f"model tensor {name!r}", t
    for idx, st in state.get("optimizer", {}).get("state", {}).items():
        for key, t in st.items():
            if isinstance(t, Tensor) and t.is_floating_point():
                yield f"optimizer state {key!r} of parameter {idx}", t


def _step_of(path: Path) -> int:
    return int(path.name[len("ckpt-") : -len(".pt")])


def _prune(folder: Path, keep: int, current: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``current``; drop files newer than it (left
    by a save that died before moving the pointer, so never loaded)."""
    ckpts = sorted((p for p in folder.glob("ckpt-*.pt") if p.name[5:-3].isdigit()), key=_step_of)
    newer = [p for p in ckpts if _step_of(p) > current]
    older = [p for p in ckpts if _step_of(p) <= current]
    for old in newer + older[: max(len(older) - keep, 0)]:
        old.unlink(missing_ok=True)


def keep_latest_only(folder: str | Path) -> None:
    """Drop every checkpoint of ``folder`` but the one ``latest.json`` names (a finished run
    needs no fallback; a lab run's checkpoint is ~100 MB). No pointer: nothing is removed."""
    pointer = latest(folder)
    if pointer is not None:
        _prune(Path(folder), 1, int(pointer["step"]))


def latest(folder: str | Path) -> dict[str, Any] | None:
    """The pointer of the newest complete checkpoint in ``folder``, or None if there is none."""
    p = Path(folder) / POINTER
    if not p.is_file():
        return None
    try:
        pointer = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint pointer {str(p)!r} is corrupt: {exc}") from exc
    if not isinstance(pointer, dict) or not isinstance(pointer.get("file"), str):
        raise CheckpointError(f"checkpoint pointer {str(p)!r} is corrupt: it names no file")
    return pointer


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint: a run folder (its latest) or a ``ckpt-*.pt`` file.

    The SHA-256 recorded in the folder's pointer is checked when there is one.
    """
    path = Path(path)
    if path.is_dir():
        pointer = latest(path)
        if pointer is None:
            raise CheckpointError(f"no checkpoint in {str(path)!r} (no {POINTER}); train first")
        file, digest = path / pointer["file"], pointer.get("sha256")
    else:
        file, digest = path, _digest_from_pointer(path)
    if not file.is_file():
        named = f" (named by {str(file.parent / POINTER)!r})" if path.is_dir() else ""
        raise CheckpointError(f"checkpoint file {str(file)!r}{named} is missing")
    data = file.read_bytes()
    if digest and hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is truncated or altered (SHA-256 mismatch with "
            f"{POINTER})"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is truncated or not a moelab checkpoint "
            f"({type(exc).__name__})"
        ) from exc
    missing = [k for k in REQUIRED if k not in state] if isinstance(state, dict) else REQUIRED
    if missing:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is not a moelab checkpoint (no {missing[0]!r})"
        )
    return state


def _digest_from_pointer(file: Path) -> str | None:
    pointer = latest(file.parent) if (file.parent / POINTER).is_file() else None
    return pointer["sha256"] if pointer and pointer.get("file") == file.name else None
