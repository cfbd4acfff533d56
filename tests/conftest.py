"""Shared fixtures: a private data cache and the micro test config."""

from pathlib import Path

import pytest
import torch

MICRO = Path(__file__).parent / "fixtures" / "micro.toml"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Tokenizer/token caches go to one temporary folder per test session."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MOELAB_CACHE", str(tmp_path_factory.mktemp("moelab-cache")))
    torch.set_num_threads(2)
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _no_committed_records(tmp_path_factory, monkeypatch):
    """Tests never read or write the committed run records (``results/runs``)."""
    from moelab.lab import runner

    monkeypatch.setattr(runner, "RECORDS", tmp_path_factory.mktemp("records"))


@pytest.fixture
def micro_cfg():
    """A function building the micro RunConfig with ``--set`` style overrides."""
    from moelab.runconfig import load_run_config

    return lambda *overrides: load_run_config(str(MICRO), list(overrides))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models gain nothing from threads; on a busy
    machine they only contend); the thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
