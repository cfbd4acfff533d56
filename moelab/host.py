"""Device -> host reads, through one door so that they can be counted.

On a GPU every ``.item()`` / ``.tolist()`` / ``int(tensor)`` waits for the device to finish its
queued work (a host synchronisation). moelab's rule: no such read per layer in the hot path;
what needs host values is read once per step (the losses, the router finiteness checks and
the gradient norm, which decide whether the step is applied) or once per logged step
(everything logged). Every explicit read in the training path goes through :func:`to_host`
or :func:`to_cpu`, and :func:`count_reads` counts them, so a CPU test checks the rule without
a GPU (``tests/test_host.py``).

The router's finiteness check is a read per layer when it runs where it is made (a pure
``routing`` call raises at once). Inside :func:`deferred_finite_checks` (the trainer's step)
it is recorded instead, a 0-dim flag per MoE layer call, and the step reads all of them with
its losses.

Reads a library call makes inside itself (``nonzero``, boolean-mask indexing, the split sizes
of an all-to-all) are not seen here; docs/DESIGN.md lists the ones moelab's paths keep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

_T = TypeVar("_T")


@dataclass
class ReadCounter:
    """What :func:`count_reads` saw: the number of reads and, per read, the caller's label."""

    reads: int = 0
    labels: list[str] = field(default_factory=list)


@dataclass
class FiniteChecks:
    """Finiteness checks recorded instead of read: (label, 0-dim bool flag) in call order."""

    flags: list[tuple[Any, Tensor]] = field(default_factory=list)

    def failed(self, values: list[bool]) -> list[Any]:
        """The labels of the checks whose read ``values`` entry is False, in call order."""
        return [label for (label, _), ok in zip(self.flags, values, strict=True) if not ok]


_COUNTERS: list[ReadCounter] = []
_DEFERRED: list[FiniteChecks] = []


def _count(what: str) -> None:
    for c in _COUNTERS:
        c.reads += 1
        c.labels.append(what)


def to_host(t: Tensor, what: str = "") -> Any:
    """``t.tolist()``: a Python number for a 0-dim tensor, nested lists otherwise; ``what``
    labels the read for :func:`count_reads`."""
    _count(what)
    return t.tolist()


def to_cpu(t: Tensor, what: str = "") -> Tensor:
    """``t`` copied to the CPU (one read when it is on another device; counted either way)."""
    _count(what)
    return t.cpu()


def count_reads() -> contextlib.AbstractContextManager[ReadCounter]:
    """Count the :func:`to_host` / :func:`to_cpu` calls made inside the block."""
    return _registered(_COUNTERS, ReadCounter())


def deferred_finite_checks() -> contextlib.AbstractContextManager[FiniteChecks]:
    """Inside the block :func:`all_finite` records its checks here instead of reading them."""
    return _registered(_DEFERRED, FiniteChecks())


@contextlib.contextmanager
def _registered(stack: list[_T], item: _T) -> Iterator[_T]:
    """Push ``item`` on ``stack`` for the block (nested blocks stack up), then remove it."""
    stack.append(item)
    try:
        yield item
    finally:
        stack.remove(item)


def deferring() -> bool:
    """Whether finiteness checks are being recorded (inside :func:`deferred_finite_checks`)."""
    return bool(_DEFERRED)


def all_finite(t: Tensor, what: str) -> bool:
    """Whether every element of ``t`` is finite: one read, or, while checks are deferred,
    True now with the flag recorded (under the :func:`check_label` in force) to be read later."""
    flag = torch.isfinite(t).all()
    if _DEFERRED:
        _DEFERRED[-1].flags.append((None, flag))
        return True
    return bool(to_host(flag, what))


@contextlib.contextmanager
def check_label(label: Any) -> Iterator[None]:
    """Checks deferred inside the block are recorded under ``label`` (e.g. the MoE layer)."""
    if not _DEFERRED:
        yield
        return
    checks, start = _DEFERRED[-1], len(_DEFERRED[-1].flags)
    try:
        yield
    finally:
        checks.flags[start:] = [(label, flag) for _, flag in checks.flags[start:]]
