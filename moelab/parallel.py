"""The torch.distributed world: expert parallelism × data parallelism from the world size
(with ``moelab.ep``, which holds the EP layout, collectives and layer, the only moelab
modules importing torch.distributed).

W world size, P EP size; the EP layout (``Layout``, EP groups and expert-DP groups) is
described in ``moelab.ep``. Every rank is data-parallel for the dense (non-expert) parameters:
it takes its own share of the global batch (dp_rank = r, dp_size = W).

What is reduced where (the loss on each rank is the mean over its own tokens):
- dense gradients: all-reduce over all W ranks, divided by W;
- expert gradients: each rank's expert gradient already sums the contributions of all tokens
  of its EP group (the backward all-to-all brings them back), so they are all-reduced over the
  expert-DP group and divided by W. Both equal the single-process gradient of the global mean.
- expert counts: gathered from all W ranks by each layer's dispatcher
  (``moelab.ep.AllToAllDispatcher.load``) and summed, so global-scope aux losses and the
  loss-free bias see the whole computation batch and stay identical.

``DistributedWorld`` implements ``moelab.world.World``; ``prepare`` gives every MoE layer its
expert shard and an ``AllToAllDispatcher`` (GShard / DeepSpeed-MoE style token exchange).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.ep import AllToAllDispatcher, Comm, Layout
from moelab.host import to_host
from moelab.moe import MoELayer

# ----------------------------------------------------------------------------- the world


def backend_for(device: torch.device) -> str:
    """The process-group backend of a run on ``device``: gloo on the CPU; on CUDA, NCCL for
    CUDA tensors and gloo for the few CPU ones (logged scalars, RNG states)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def _init_process_group(timeout_s: float, device: torch.device) -> bool:
    """From the torchrun environment, for a run on ``device`` (:func:`backend_for`); True if
    we did it."""
    if dist.is_initialized():
        return False
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    # torchrun shares its rendezvous store with the workers; after a restart the new workers
    # would read the dead attempt's gloo keys from it (pytorch/pytorch#135712). Each attempt
    # gets its own key prefix.
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"moelab/attempt{attempt}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return True


class DistributedWorld:
    """The torch.distributed ``World``: EP × DP from the world size (see the module docstring)."""

    def __init__(self, parallel_cfg: Any, device: torch.device | None = None) -> None:
        if _init_process_group(parallel_cfg.timeout_s, device or torch.device("cpu")):
            atexit.register(_destroy)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_size, self.is_main = self.rank, self.world_size, self.rank == 0
        self.ep = parallel_cfg.ep
        # World-group collectives only, until the EP layout is known to be the same everywhere.
        world_only = Layout(self.rank, self.world_size, 1)
        self.comm = Comm(world_only, parallel_cfg.timeout_s, groups=False)
        self._check_same(_cfg_dict(parallel_cfg), "parallel config")
        if self.world_size % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} must divide the world size {self.world_size}; allowed: "
                f"a divisor of {self.world_size}"
            )
        self.layout = Layout(self.rank, self.world_size, self.ep)
        self.comm = Comm(self.layout, parallel_cfg.timeout_s)
        self._expert_params: dict[str, int] = {}  # parameter name -> E (full expert count)

    # ------------------------------------------------------------------ setup

    def _check_same(self, obj: Any, what: str) -> None:
        """Refuse to start unless every rank has the same ``obj`` (a JSON-able config)."""
        text = json.dumps(obj, sort_keys=True, default=str)
        texts = self.comm.all_gather_object(text, f"all_gather of the {what}")
        bad = [r for r, t in enumerate(texts) if t != texts[0]]
        if bad:
            diff = _first_difference(json.loads(texts[0]), json.loads(texts[bad[0]]))
            raise ValueError(
                f"the {what} differs across ranks: ranks {bad} differ from rank 0 ({diff}); "
                "launch every rank with the same config and --set overrides"
            )

    def prepare(self, model: nn.Module, cfg: Any) -> nn.Module:
        """Check configs, broadcast rank 0's weights, shard experts, give every MoE layer the
        all-to-all dispatcher."""
        self._check_same(_cfg_dict(cfg), "run config")
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
        for _, layer in layers:
            _check_placement(layer, self.ep, self.world_size)
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            self.comm.broadcast(t.data, f"broadcast of {name}")
        for name, layer in layers:
            self._shard(name, layer)
        return model

    def _shard(self, name: str, layer: MoELayer) -> None:
        E, mine = layer.cfg.num_experts, self.layout.expert_slice(layer.cfg.num_experts)
        for pname in layer.experts.keep_only(mine):
            self._expert_params[f"{name}.experts.{pname}"] = E
        layer.dispatcher = AllToAllDispatcher(self.comm, E)

    # ------------------------------------------------------------------ gradients

    def _split_params(self, model: nn.Module) -> tuple[list, list]:
        dense, expert = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (expert if name in self._expert_params else dense).append(p)
        return dense, expert

    def sync_grads(self, model: nn.Module) -> None:
        """Dense grads: mean over all ranks; expert grads: sum over the expert-DP group / W."""
        dense, expert = self._split_params(model)
        W = self.world_size
        if dense:
            has = torch.tensor([float(p.grad is not None) for p in dense], device=dense[0].device)
            flat = torch.cat([_grad_or_zeros(p).reshape(-1).float() for p in dense] + [has])
            self.comm.all_reduce(flat, "all_reduce of dense gradients")
            grads, has = flat[: -len(dense)], flat[-len(dense) :]
            has_list = to_host(has, "which dense parameters have gradients")
            for p, g, h in zip(dense, _unflatten(grads, dense), has_list, strict=True):
                p.grad = g.div_(W).to(p.dtype) if h > 0 else None
        if expert:
            flat = torch.cat([_grad_or_zeros(p).reshape(-1).float() for p in expert])
            self.comm.all_reduce(
                flat, "all_reduce of expert gradients", group=self.comm.expert_dp_group
            )
            for p, g in zip(expert, _unflatten(flat, expert), strict=True):
                p.grad = g.div_(W).to(p.dtype)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """The global gradient norm (dense once + every expert shard), clipped like
        ``torch.nn.utils.clip_grad_norm_``; the same value on every rank."""
        dense, expert = self._split_params(model)
        dense = [p for p in dense if p.grad is not None]
        expert = [p for p in expert if p.grad is not None]
        sq = torch.zeros(2, dtype=torch.float64)
        norms = _grad_norms(dense + expert)  # one host read for all parameters
        sq[0] = sum(n**2 for n in norms[: len(dense)])
        sq[1] = sum(n**2 for n in norms[len(dense) :])
        self.comm.all_reduce(sq[1:], "all_reduce of the gradient norm", group=self.comm.ep_group)
        total = float(sq.sum().sqrt())
        if max_norm > 0:
            coef = min(1.0, max_norm / (total + 1e-6))
            for p in dense + expert:
                p.grad.mul_(coef)
        return total

    def mean(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        return float(self.comm.all_reduce(t, "all_reduce of a logged value")) / self.world_size

    def sum_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over all ranks, in place (evaluation statistics)."""
        return self.comm.all_reduce(t, "all_reduce of evaluation statistics")

    # ------------------------------------------------------------------ state

    def full_state_dict(self, model: nn.Module) -> dict:
        """The single-process state dict: expert shards gathered to (E, ...) on every rank."""
        state = model.state_dict()
        for name in self._expert_params:
            state[name] = self._gather_rows(state[name], f"gather of {name}")
        return state

    def load_full_state_dict(self, model: nn.Module, state: dict) -> None:
        """Load a single-process (full) state dict, keeping this rank's expert rows."""
        state = dict(state)
        for name, E in self._expert_params.items():
            state[name] = state[name][self.layout.expert_slice(E)]
        model.load_state_dict(state)

    def optimizer_state(self, opt: torch.optim.Optimizer, model: nn.Module) -> dict:
        """``opt.state_dict()`` in the single-process layout (expert moments gathered)."""
        state = opt.state_dict()
        names = _param_names(opt, model)
        out = dict(state, state=dict(state["state"]))
        for idx, st in state["state"].items():
            if names[idx] in self._expert_params:
                out["state"][idx] = {
                    k: self._gather_rows(v, f"gather of optimizer state {names[idx]}.{k}")
                    if _is_rows(v)
                    else v
                    for k, v in st.items()
                }
        return out

    def load_optimizer_state(self, opt: torch.optim.Optimizer, model: nn.Module, s: dict) -> None:
        names = _param_names(opt, model)
        state = dict(s, state=dict(s["state"]))
        for idx, st in s["state"].items():
            E = self._expert_params.get(names[int(idx)])
            if E is not None:
                rows = self.layout.expert_slice(E)
                state["state"][idx] = {k: v[rows] if _is_rows(v) else v for k, v in st.items()}
        opt.load_state_dict(state)

    def _gather_rows(self, t: Tensor, what: str) -> Tensor:
        return self.comm.all_gather_cat(t.detach(), what, group=self.comm.ep_group)

    def gather_rng(self, state: dict) -> list[dict]:
        return self.comm.all_gather_object(state, "all_gather of RNG states")

    def pick_rng(self, states: list[dict]) -> dict:
        """This rank's RNG state; a checkpoint from fewer ranks reuses rank ``r % n``'s."""
        return states[self.rank % len(states)]

    def barrier(self) -> None:
        self.comm.barrier()

    # ------------------------------------------------------------------ logging

    def extra_stats(self, result: Any, model: nn.Module) -> dict:
        """Per-rank load and straggler factor (max / mean rank load) of the computation batch,
        drops per rank, and per-expert gradient norms gathered to all E experts."""
        row: dict[str, Any] = {"world_size": self.world_size, "ep": self.ep}
        if result.expert_grad_norms:
            row["expert_grad_norm_layers"] = [
                [round(float(g), 6) for g in self._gather_rows(e, "gather of expert grad norms")]
                for e in result.expert_grad_norms
            ]
        micro = [m for m in result.moe_stats if m and "rank_load" in m[0]]
        if not micro:
            return row
        n_layers = len(micro[0])
        loads = [[m[i]["rank_load"].double() for m in micro] for i in range(n_layers)]
        strag = [
            sum(float(x.max() / x.mean().clamp_min(1e-9)) for x in lay) / len(lay) for lay in loads
        ]
        dropped_W = sum(m[i]["dropped_rank"] for m in micro for i in range(n_layers))
        row |= {
            "rank_load_layers": [(sum(lay) / len(lay)).tolist() for lay in loads],
            "straggler_layers": strag,
            "straggler": sum(strag) / len(strag),
            "dropped_ranks": dropped_W.tolist(),
        }
        return row


# ----------------------------------------------------------------------------- helpers


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _cfg_dict(cfg: Any) -> Any:
    from moelab.config import to_dict

    return to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    """Where two JSON values first differ: ``key.path: a vs b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path or 'value'}: {a!r} vs {b!r}"


def _check_placement(layer: MoELayer, ep: int, world_size: int) -> None:
    """EP must divide E; device-level losses must count the real devices (EP ranks)."""
    E, b = layer.cfg.num_experts, layer.cfg.balance
    if E % ep:
        raise ValueError(
            f"parallel.ep={ep} must divide moe.num_experts={E} (each EP rank holds "
            f"num_experts/ep experts; world size {world_size}); allowed: a common divisor"
        )
    if ep > 1 and (b.device_coef > 0 or b.comm_coef > 0) and b.num_devices != ep:
        raise ValueError(
            f"balance.num_devices={b.num_devices} must equal parallel.ep={ep} when the device "
            "or communication loss is on (experts are placed contiguously on the EP ranks)"
        )


def _grad_norms(params: list[Tensor]) -> list[float]:
    """The fp32 gradient norm of each parameter, read to the host at once."""
    if not params:
        return []
    return to_host(torch.stack([p.grad.float().norm() for p in params]), "gradient norms")


def _grad_or_zeros(p: Tensor) -> Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _unflatten(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for p in like:
        out.append(flat[i : i + p.numel()].view_as(p).clone())
        i += p.numel()
    return out


def _param_names(opt: torch.optim.Optimizer, model: nn.Module) -> dict[int, str]:
    """Optimizer state-dict index -> parameter name (indices follow the param groups)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    order = [p for g in opt.param_groups for p in g["params"]]
    return {i: by_id[id(p)] for i, p in enumerate(order)}


def _is_rows(v: Any) -> bool:
    return isinstance(v, Tensor) and v.ndim >= 1
