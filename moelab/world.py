"""The process layout a trainer runs in. ``LocalWorld`` is one process; ``moelab.parallel``
provides the torch.distributed one with the same methods (it and ``moelab.ep`` are the only
modules importing torch.distributed)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

from moelab.host import to_host


class World(Protocol):
    """What the trainer needs from a process layout."""

    rank: int
    world_size: int
    dp_rank: int  # index of this rank's share of the batch
    dp_size: int  # number of shares of the batch
    is_main: bool

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module: ...
    def sync_grads(self, model: nn.Module) -> None: ...
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float: ...
    def mean(self, x: float) -> float: ...
    def sum_(self, t: Tensor) -> Tensor: ...
    def full_state_dict(self, model: nn.Module) -> dict: ...
    def load_full_state_dict(self, model: nn.Module, state: dict) -> None: ...
    def optimizer_state(self, opt: torch.optim.Optimizer, model: nn.Module) -> dict: ...
    def load_optimizer_state(
        self, opt: torch.optim.Optimizer, model: nn.Module, s: dict
    ) -> None: ...
    def gather_rng(self, state: dict) -> list[dict]: ...
    def pick_rng(self, states: list[dict]) -> dict: ...
    def barrier(self) -> None: ...
    def extra_stats(self, result: Any, model: nn.Module) -> dict: ...


class LocalWorld:
    """A single process: every method is the identity or plain torch."""

    rank = 0
    world_size = 1
    dp_rank = 0
    dp_size = 1
    is_main = True

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module:
        return model

    def sync_grads(self, model: nn.Module) -> None:
        pass

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if max_norm <= 0:
            norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        return float(to_host(norm, "gradient norm"))

    def mean(self, x: float) -> float:
        return x

    def sum_(self, t: Tensor) -> Tensor:
        return t

    def full_state_dict(self, model: nn.Module) -> dict:
        return model.state_dict()

    def load_full_state_dict(self, model: nn.Module, state: dict) -> None:
        model.load_state_dict(state)

    def optimizer_state(self, opt: torch.optim.Optimizer, model: nn.Module) -> dict:
        return opt.state_dict()

    def load_optimizer_state(self, opt: torch.optim.Optimizer, model: nn.Module, s: dict) -> None:
        opt.load_state_dict(s)

    def gather_rng(self, state: dict) -> list[dict]:
        return [state]

    def pick_rng(self, states: list[dict]) -> dict:
        return states[self.rank]

    def barrier(self) -> None:
        pass

    def extra_stats(self, result: Any, model: nn.Module) -> dict:
        """Entries added to the logged row (per-rank load, stragglers under EP); none here."""
        return {}


def make_world(parallel_cfg: Any, device: torch.device | None = None) -> World:
    """The torch.distributed world (under torchrun: WORLD_SIZE > 1) for a run on ``device``
    (gloo for the CPU, NCCL for CUDA)."""
    from moelab import parallel

    return parallel.DistributedWorld(parallel_cfg, device)
