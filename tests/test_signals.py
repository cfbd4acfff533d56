"""Stop signals: a run saves and stops on the first, a second stops at once, and a supervised
worker (the lab's pretrain pool) remembers a stop that came while no run listened."""

import os
import signal

import pytest

from moelab import signals
from moelab.signals import Interrupted, defer_signals, stop_on_signals, stop_pending

FAST = ("train.eval_every=0", "train.log_every=1", "train.steps=6")


@pytest.fixture
def deferred(monkeypatch):
    """This process as a pool worker: signals deferred; handlers and flags restored after."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(signals, "_pending", None)
    monkeypatch.setattr(signals, "_escalate", True)
    defer_signals()
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_second_signal_stops_a_plain_run_at_once(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(SystemExit) as exc:
        with stop_on_signals() as flag:
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.code == 143


def test_a_stop_between_runs_raises_the_next_runs_flag(deferred):
    assert stop_pending() is None
    os.kill(os.getpid(), signal.SIGTERM)  # e.g. while a snapshot routes the validation stream
    assert stop_pending() == signal.SIGTERM
    with stop_on_signals() as flag:
        assert flag.signum == signal.SIGTERM


def test_a_supervised_worker_does_not_escalate_a_doubled_signal(deferred):
    """A group kill and the parent's forwarded SIGTERM arrive together: the run still saves."""
    with stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signum == signal.SIGTERM


def test_a_torchrun_rank_does_not_escalate_a_doubled_signal(monkeypatch):
    """torchrun's agent forwards the SIGTERM (or Ctrl-C) it got to ranks that a group kill has
    already reached: the doubled signal still lets the rank save."""
    monkeypatch.setattr(signals, "_escalate", True)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with stop_on_signals() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.signum == signal.SIGTERM


def test_a_worker_told_to_stop_saves_after_one_step_and_starts_no_job(
    deferred, micro_cfg, tmp_path
):
    from moelab import checkpoint
    from moelab.lab import _pool_job
    from moelab.train import train

    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(Interrupted, match="after step 1; checkpoint saved"):
        train(micro_cfg(*FAST), tmp_path / "run", progress=False)
    assert checkpoint.latest(tmp_path / "run")["step"] == 1
    assert _pool_job(micro_cfg(*FAST), 0, 1) is None  # nothing trained, nothing cached
