"""Device -> host reads, through one door so that they can be counted.

On a GPU every ``.item()`` / ``.tolist()`` / ``int(tensor)`` waits for the device to finish its
queued work (a host synchronisation). moelab's rule: no such read per layer in the hot path;
the statistics that need host values are read once per step (the loss and gradient norm,
which decide whether the step is applied) or once per logged step (everything logged). Every
explicit read in the training path goes through :func:`to_host`, and :func:`count_reads`
counts them, so a CPU test can check the rule without a GPU (``tests/test_host.py``).

Reads a library call makes inside itself (``nonzero``, boolean-mask indexing, the split sizes
of an all-to-all) are not seen here; docs/DESIGN.md lists the ones moelab's paths keep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class ReadCounter:
    """What :func:`count_reads` saw: the number of reads and, per read, the caller's label."""

    reads: int = 0
    labels: list[str] = field(default_factory=list)


_COUNTERS: list[ReadCounter] = []


def to_host(t: Tensor, what: str = "") -> Any:
    """``t.tolist()``: a Python number for a 0-dim tensor, nested lists otherwise; ``what``
    labels the read for :func:`count_reads`."""
    for c in _COUNTERS:
        c.reads += 1
        c.labels.append(what)
    return t.tolist()


def to_cpu(t: Tensor, what: str = "") -> Tensor:
    """``t`` copied to the CPU (one read when it is on another device; counted either way)."""
    for c in _COUNTERS:
        c.reads += 1
        c.labels.append(what)
    return t.cpu()


@contextlib.contextmanager
def count_reads() -> Iterator[ReadCounter]:
    """Count the :func:`to_host` calls made inside the block (nested blocks all count)."""
    counter = ReadCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)
