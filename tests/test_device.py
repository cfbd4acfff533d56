"""Specification of moelab.device: ``train.device`` / ``train.dtype`` made into a torch device
and an autocast context. Every branch runs on the CPU; CUDA's are reached by a stand-in for
``torch.cuda`` (is_available / device_count), the real device by the ``cuda`` tests."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from moelab import device
from moelab.runconfig import TrainConfig

MICRO = str(Path(__file__).parent / "fixtures" / "micro.toml")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_allowed_spellings_pass(spec):
    device.check_spec(spec)
    assert TrainConfig(device=spec).device == spec


@pytest.mark.parametrize("spec", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", ""])
def test_other_spellings_are_refused_naming_the_field(spec):
    """A bad train.device is one line naming the field and the allowed values (a value that is
    no string at all is refused by the config's type check, naming the field too)."""
    with pytest.raises(ValueError) as err:
        TrainConfig(device=spec)
    msg = str(err.value)
    assert "\n" not in msg and "train.device=" in msg and "'auto', 'cpu', 'cuda' or 'cuda:N'" in msg
    with pytest.raises(ValueError, match=r"train\.device=0 .*string"):
        TrainConfig(device=0)


def test_without_cuda_auto_and_cpu_give_the_cpu(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    assert device.resolve("auto") == torch.device("cpu")
    assert device.resolve("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_one_line_error_naming_the_field(monkeypatch, spec):
    _fake_cuda(monkeypatch, 0)
    with pytest.raises(ValueError, match=rf"^train\.device='{spec}' but CUDA is not available"):
        device.resolve(spec)


def test_with_cuda_auto_and_cuda_take_the_local_rank_gpu(monkeypatch):
    """auto / cuda: GPU LOCAL_RANK (mod the GPUs there are; 0 outside torchrun); the CPU on
    request."""
    _fake_cuda(monkeypatch, 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert device.resolve("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device.resolve("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device.resolve("auto") == torch.device("cuda", 1)
    assert device.resolve("cpu") == torch.device("cpu")


def test_cuda_n_names_one_gpu_that_exists_and_only_in_one_process(monkeypatch):
    _fake_cuda(monkeypatch, 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert device.resolve("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"train\.device='cuda:2' but this machine has 2 CUDA"):
        device.resolve("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="under torchrun use 'cuda' or 'auto'"):
        device.resolve("cuda:1")


def test_autocast_is_bf16_on_the_device_type_and_nothing_for_fp32():
    """bf16 autocasts on the run's device type (not always the CPU's); fp32 autocasts nothing."""
    ctx = device.autocast("bf16", torch.device("cpu"))
    with ctx:
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with warnings.catch_warnings():  # without CUDA torch warns that it disables it
        warnings.simplefilter("ignore")
        cuda_ctx = device.autocast("bf16", torch.device("cuda", 0))
    assert isinstance(cuda_ctx, torch.autocast) and cuda_ctx.device == "cuda"
    with device.autocast("fp32", torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_device_rng_state_is_empty_on_the_cpu_and_of_a_module():
    """The CPU run saves no device RNG (its checkpoints are as before); ``of`` finds a
    module's device."""
    assert device.rng_state(torch.device("cpu")) == {}
    device.set_rng_state({}, torch.device("cpu"))  # nothing to restore, no error
    assert device.of(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert device.of(torch.nn.Identity()) == torch.device("cpu")


@no_cuda
def test_the_cli_refuses_cuda_without_cuda_in_one_line(tmp_path):
    """``moelab train --set train.device='cuda'`` on a machine without CUDA: exit 2, one line
    naming the field, before any data is loaded."""
    cmd = [sys.executable, "-m", "moelab", "train", "--config", MICRO, "--quiet"]
    cmd += ["--out", str(tmp_path / "run"), "--set", "train.device='cuda'"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moelab train: error: train.device='cuda'")
    assert not (tmp_path / "run").exists()


def test_a_cuda_run_saves_and_restores_the_device_generator(monkeypatch):
    """On CUDA the RNG state gains the device generator's (``"cuda"``), restored on a CUDA
    run and ignored on a CPU one (stand-ins for torch.cuda's RNG calls)."""
    seen = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda dev: torch.tensor([7, 8]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, dev: seen.append((s.tolist(), dev)))
    gpu = torch.device("cuda", 1)
    state = device.rng_state(gpu)
    assert list(state) == ["cuda"]
    device.set_rng_state(state, torch.device("cpu"))
    assert seen == []
    device.set_rng_state(state, gpu)
    assert seen == [([7, 8], gpu)]
