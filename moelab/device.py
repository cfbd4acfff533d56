"""Where a run computes: ``train.device`` and ``train.dtype`` made into a torch device and an
autocast context.

``train.device`` is ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or
``"cuda:N"``. Under torchrun (``LOCAL_RANK`` set) ``"auto"`` and ``"cuda"`` give each rank its
``LOCAL_RANK`` GPU. A spelling outside these is refused when the config is built; CUDA that is
asked for but missing is refused when the run starts (a config written on a GPU machine still
loads on a CPU one, e.g. to evaluate its checkpoint with ``--device cpu``).
"""

from __future__ import annotations

import contextlib
import os
import re
from contextlib import AbstractContextManager

import torch
from torch import nn

ALLOWED = "'auto', 'cpu', 'cuda' or 'cuda:N'"
_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_spec(spec: object, name: str = "train.device") -> None:
    """Raise ValueError naming ``name`` unless ``spec`` is one of :data:`ALLOWED`."""
    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise ValueError(f"{name}={spec!r} is not allowed; allowed: {ALLOWED}")


def resolve(spec: str = "auto", name: str = "train.device") -> torch.device:
    """The torch device for ``spec`` on this machine and rank (see the module docstring);
    a one-line ValueError naming ``name`` when it asks for CUDA that is not there."""
    check_spec(spec, name)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"{name}={spec!r} but CUDA is not available on this machine; allowed here: 'auto' "
            "or 'cpu'"
        )
    count = torch.cuda.device_count()
    if spec in ("auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % count)
    index = int(spec.split(":")[1])
    if index >= count:
        raise ValueError(
            f"{name}={spec!r} but this machine has {count} CUDA device(s); allowed: cuda:0 to "
            f"cuda:{count - 1}, 'cuda' or 'auto'"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"{name}={spec!r} names one GPU for every rank; under torchrun use 'cuda' or 'auto' "
            "(each rank takes its LOCAL_RANK GPU)"
        )
    return torch.device("cuda", index)


def of(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for an empty module)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def autocast(dtype: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast on ``device``'s type for ``train.dtype = "bf16"``; nothing for fp32."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG state of ``device`` beyond the CPU generator: ``{"cuda": ...}`` on a GPU."""
    return {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore :func:`rng_state`; a checkpoint from another device type keeps this one's."""
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
