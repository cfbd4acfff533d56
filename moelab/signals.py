"""Graceful stop: SIGINT (Ctrl-C) and SIGTERM (torchrun, cluster schedulers) end a run at the
next step boundary with a checkpoint, instead of losing every step since the last one.

The first signal only sets a flag; the trainer finishes the optimizer step in progress, saves
a checkpoint at that step and raises :class:`Interrupted` (exit status 130 for SIGINT, 143 for
SIGTERM). A second signal stops at once (KeyboardInterrupt, or SystemExit(143)), except in
a supervised worker (:func:`defer_signals`) or a torchrun rank, whose supervisor forwards the
first signal and escalates itself.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moelab.errors import RunError

_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
_pending: int | None = None  # a stop signal that arrived between runs (see defer_signals)
_escalate = True  # whether a second signal stops at once (off in supervised workers)


class Interrupted(RunError):
    """The run stopped on a signal after saving a checkpoint at ``step``."""

    def __init__(self, signum: int, step: int, out: Path) -> None:
        self.exit_code = _EXIT.get(signum, 130)
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint saved in {str(out)!r} "
            "(continue with --resume)"
        )


class StopFlag:
    """Which stop signal arrived first (``signum``), None while none has."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None or not _escalate or _under_torchrun():
            self.signum = self.signum or signum
            return
        if signum == signal.SIGTERM:  # the second signal: stop now, without a save
            raise SystemExit(_EXIT[signal.SIGTERM])
        raise KeyboardInterrupt


def _under_torchrun() -> bool:
    """A torchrun rank: its agent forwards the stop it got as SIGTERM to every rank, so a rank
    hit by a group kill or a terminal's Ctrl-C sees the signal twice; the second must not stop
    it before its save (the agent escalates with SIGKILL after its own timeout)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


@contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Catch SIGINT and SIGTERM into a :class:`StopFlag` while the body runs (main thread only;
    elsewhere the flag never rises and signals act as before)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    flag.signum = _pending  # a stop that came while no run listened: stop after one step
    previous = {s: signal.signal(s, flag._handle) for s in _EXIT}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _remember(signum: int, frame) -> None:
    global _pending
    _pending = _pending or signum


def defer_signals() -> None:
    """For a worker process that a supervisor stops (the lab's pretrain pool): SIGINT and
    SIGTERM that arrive while no run listens (between runs, or between the segments of one)
    are remembered, and the next :func:`stop_on_signals` starts with its flag raised, so that
    run saves after its first step and stops. A second signal no longer stops at once: a group
    kill plus the supervisor's forwarded SIGTERM arrive together, and the supervisor escalates
    with SIGKILL itself."""
    global _escalate
    _escalate = False
    for s in _EXIT:
        signal.signal(s, _remember)


def stop_pending() -> int | None:
    """The stop signal :func:`defer_signals` remembered, None while none has arrived."""
    return _pending
