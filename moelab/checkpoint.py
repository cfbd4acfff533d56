"""Crash-safe checkpoints: write to a temporary file, fsync, rename, then move a pointer.

Layout of a run folder::

    ckpt-000200.pt     one complete checkpoint (torch.save of a dict)
    latest.json        {"file": "ckpt-000200.pt", "step": 200, "sha256": "..."}

A save that dies at any point leaves the previous ``latest.json`` and the file it names
intact (OLMo-core / Megatron practice). Stale ``*.tmp`` files from an interrupted save are
removed at the next save. Loading checks the SHA-256 in the pointer, so a truncated or
foreign file gives a one-line error naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

POINTER = "latest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, with a message saying what to fix."""


def _fsync_write(path: Path, data: bytes) -> None:
    """Write bytes to ``path.tmp``, fsync, rename to ``path`` (atomic on POSIX)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
    folder (the previous checkpoint stays the one that loads).
    """
    folder = Path(folder)
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
    _prune(folder, keep)
    return folder / name


def _prune(folder: Path, keep: int) -> None:
    ckpts = sorted(folder.glob("ckpt-*.pt"))
    for old in ckpts[: max(len(ckpts) - keep, 0)]:
        old.unlink(missing_ok=True)


def latest(folder: str | Path) -> dict[str, Any] | None:
    """The pointer of the newest complete checkpoint in ``folder``, or None if there is none."""
    p = Path(folder) / POINTER
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint pointer {str(p)!r} is corrupt: {exc}") from exc


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
        raise CheckpointError(f"checkpoint file {str(file)!r} is missing")
    data = file.read_bytes()
    if digest and hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(
            f"checkpoint file {str(file)!r} is truncated or altered (SHA-256 mismatch)"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint file {str(file)!r} is not a moelab checkpoint") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint file {str(file)!r} is not a moelab checkpoint")
    return state


def _digest_from_pointer(file: Path) -> str | None:
    pointer = latest(file.parent) if (file.parent / POINTER).is_file() else None
    return pointer["sha256"] if pointer and pointer.get("file") == file.name else None
