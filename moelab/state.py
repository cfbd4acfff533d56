"""The trainer's state: what the loop advances, a checkpoint holds and a resume restores.

``TrainerState`` (config, model, optimizer, batcher, dead-expert trackers, world, device,
step, data digest) is built by :func:`moelab.train.train` and handed to its loop; its
``state_dict`` / ``save`` / ``restore`` are the checkpoint format (the single-process layout,
every tensor on the CPU, so that a run saved on a GPU resumes on the CPU and back).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab import checkpoint, device, metrics, runfolder
from moelab.config import to_dict
from moelab.data import Batcher
from moelab.model import MoELM
from moelab.runconfig import RunConfig
from moelab.world import World


def rng_state(dev: torch.device | None = None) -> dict[str, Any]:
    """The RNG states a resume restores: torch's CPU generator, numpy, Python, and on a GPU
    run the device's generator (``"cuda"``)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        **device.rng_state(dev or torch.device("cpu")),
    }


def set_rng_state(state: dict[str, Any], dev: torch.device | None = None) -> None:
    """Restore :func:`rng_state` (a checkpoint from another device type keeps this one's)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    device.set_rng_state(state, dev or torch.device("cpu"))


@dataclass
class TrainerState:
    """Everything the loop advances and a checkpoint holds: the run's config, model,
    optimizer, batcher and dead-expert trackers, the world and device it runs on, the
    optimizer steps done and the corpus's data digest (checked on resume unless None)."""

    cfg: RunConfig
    model: MoELM
    opt: torch.optim.Optimizer
    batcher: Batcher
    trackers: list[metrics.DeadExpertTracker]
    world: World
    device: torch.device
    step: int = 0
    digest: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: single-process layout, every tensor on the CPU (so that it loads on
        any device; a CPU run's tensors are saved as they are)."""
        w, cpu = self.world, self.device.type == "cpu"
        model, opt = w.full_state_dict(self.model), w.optimizer_state(self.opt, self.model)
        return {
            "model": model if cpu else _on_cpu(model),
            "optimizer": opt if cpu else _on_cpu(opt),
            "batcher": self.batcher.state_dict(),
            "trackers": [t.state_dict() for t in self.trackers],
            "rng": w.gather_rng(rng_state(self.device)),
            "step": self.step,
            "config": to_dict(self.cfg),
            "layout": {"world_size": w.world_size, "ep": self.cfg.parallel.ep},
            "data_digest": self.digest,
        }

    def save(self, out: Path) -> None:
        """Every rank checks the state is finite (so all stop together), rank 0 writes."""
        state = self.state_dict()
        checkpoint.check_finite(state, self.step)
        if self.world.is_main:
            checkpoint.save(out, state, self.step, keep=self.cfg.train.keep_checkpoints)
        self.world.barrier()

    def restore(self, out: Path, allow_change: tuple[str, ...] = ()) -> None:
        """Load the latest checkpoint of ``out`` (saved on any device) into this state. Refuses
        one written for another config or other data (:func:`moelab.runfolder.check_resume`,
        :func:`moelab.runfolder.check_data`)."""
        state = checkpoint.load(out)  # tensors on the CPU; loading copies them to the device
        check_layout(out, self.cfg, self.world, state.get("layout"))  # most specific first
        runfolder.check_resume(out, state["config"], to_dict(self.cfg), allow=allow_change)
        if self.digest is not None:
            runfolder.check_data(out, state.get("data_digest"), self.digest)
        self.world.load_full_state_dict(self.model, state["model"])
        self.world.load_optimizer_state(self.opt, self.model, state["optimizer"])
        self.batcher.load_state_dict(state["batcher"])
        for t, s in zip(self.trackers, state["trackers"], strict=True):
            t.load_state_dict(s)
        set_rng_state(self.world.pick_rng(state["rng"]), self.device)
        self.step = int(state["step"])


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it moved to the CPU: nested dicts (their type and
    attributes kept, e.g. a state dict's ``_metadata``), lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = _on_cpu(v)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def check_layout(out, cfg: RunConfig, world: World, saved: dict | None) -> None:
    """Checkpoints hold the single-process layout, so any EP size loads (experts re-sharded);
    with ``parallel.batch = "per_rank"`` the world size sets the batch and must not change."""
    if saved is None or cfg.parallel.batch != "per_rank" or saved["world_size"] == world.world_size:
        return
    raise checkpoint.CheckpointError(
        f"checkpoint in {str(out)!r} was written by {saved['world_size']} ranks with "
        f"parallel.batch='per_rank' (batch of {saved['world_size']}x{cfg.train.batch_size} "
        f"sequences); resume with {saved['world_size']} ranks or start a new --out folder"
    )
