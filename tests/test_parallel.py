"""Specification of moelab.parallel: expert parallelism over gloo process groups spawned here.

Each test spawns W CPU processes (one thread each) that rendezvous on a free local port, runs a
worker function in every rank and compares what the ranks return with one plain process.
Equivalence under capacity drops: capacity is per source rank (local), so EP with drops equals
one process run separately on each rank's shard (its outputs concatenated, its losses averaged).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest
import torch
from ranks import spawn, values

from moelab.config import BalanceConfig, CapacityConfig, MoEConfig
from moelab.moe import MoELayer

T_GLOBAL, D = 32, 8


# ----------------------------------------------------------------------------- layer workers


def _layer_cfg(capacity: float, aux_scope: str) -> MoEConfig:
    return MoEConfig(
        d_model=D,
        num_experts=8,
        top_k=2,
        d_expert=8,
        balance=BalanceConfig(aux_coef=0.01, aux_scope=aux_scope, bias_rate=0.01),
        capacity=CapacityConfig(factor=capacity),
    )


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(T_GLOBAL, D, generator=g)
    x[:, 0] += 2.0  # skew the routing so capacity binds
    return x, torch.randn(T_GLOBAL, D, generator=g)


def _model(cfg: MoEConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"moe": MoELayer(cfg)})


def _loss(layer, x, g):
    out = layer(x)
    return (out.output * g).sum() / x.shape[0] + out.aux_total, out


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _ep_layer_worker(rank: int, ep: int, capacity: float, aux_scope: str, steps: int) -> dict:
    """One forward/backward on this rank's shard, grads synced; then ``steps`` bias updates."""
    from moelab.parallel import DistributedWorld
    from moelab.runconfig import ParallelConfig

    cfg = _layer_cfg(capacity, aux_scope)
    world = DistributedWorld(ParallelConfig(ep=ep, timeout_s=30))
    model = world.prepare(_model(cfg), cfg)
    layer = model["moe"]
    x, g = _data(0)
    x_r = x.chunk(world.world_size)[rank].clone().requires_grad_(True)
    loss, out = _loss(layer, x_r, g.chunk(world.world_size)[rank])
    loss.backward()
    world.sync_grads(model)
    full = {
        n: world._gather_rows(p.grad, "test") if n in world._expert_params else p.grad
        for n, p in model.named_parameters()
    }
    result = {
        "out": out.output.detach(),
        "x_grad": x_r.grad,
        "grads": full,
        "counts": out.counts,
        "dropped": int(out.dropped),
        "rank_load": out.stats["rank_load"],
        "state": world.full_state_dict(model),
    }
    model.zero_grad()
    layer.step_counts.zero_()
    for step in range(1, steps + 1):
        x, _ = _data(step)
        with torch.no_grad():
            layer(x.chunk(world.world_size)[rank])
        layer.end_step(steps)
    result["bias"] = layer.bias.clone()
    return result


def _reference(cfg: MoEConfig, world_size: int, per_shard: bool, steps: int) -> dict:
    """One process: the global batch at once, or (per_shard) each rank's shard separately."""
    model = _model(cfg)
    layer = model["moe"]
    x, g = _data(0)
    x = x.clone().requires_grad_(True)
    shards = list(zip(x.chunk(world_size), g.chunk(world_size), strict=True))
    parts = shards if per_shard else [(x, g)]
    outs, dropped, counts = [], 0, 0
    for xs, gs in parts:
        loss, out = _loss(layer, xs, gs)
        (loss / len(parts)).backward()
        outs.append(out.output.detach())
        dropped += int(out.dropped)
        counts = counts + out.counts
    grads = _grads(model)
    layer.step_counts.zero_()
    for step in range(1, steps + 1):
        xs, _ = _data(step)
        with torch.no_grad():
            layer(xs)
        layer.end_step(steps)
    return {
        "out": torch.cat(outs),
        "x_grad": x.grad,
        "grads": grads,
        "counts": counts,
        "dropped": dropped,
        "bias": layer.bias.clone(),
        "state": model.state_dict(),
    }


def _check_layer(world_size: int, ep: int, capacity: float, aux_scope: str) -> None:
    steps = 20
    cfg = _layer_cfg(capacity, aux_scope)
    ranks = values(spawn(world_size, _ep_layer_worker, ep, capacity, aux_scope, steps), world_size)
    ref = _reference(cfg, world_size, per_shard=capacity > 0, steps=steps)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), ref["out"], **tol)
    # x_r's gradient is of the rank's own loss; the global mean loss divides by W.
    x_grad = torch.cat([r["x_grad"] for r in ranks]) / world_size
    torch.testing.assert_close(x_grad, ref["x_grad"], **tol)
    for r in ranks:
        for name, g in ref["grads"].items():
            torch.testing.assert_close(r["grads"][name], g, **tol, msg=name)
        assert torch.equal(r["counts"], ref["counts"])
        assert r["dropped"] == ref["dropped"]
        assert int(r["rank_load"].sum()) == int(ref["counts"].sum()) - ref["dropped"]
        assert torch.equal(r["bias"], ranks[0]["bias"])
        for name, t in ref["state"].items():
            if name != "moe.bias" and name != "moe.step_counts":
                torch.testing.assert_close(r["state"][name], t, msg=name)
    torch.testing.assert_close(ranks[0]["bias"], ref["bias"])
    if capacity > 0:
        assert ref["dropped"] > 0, "the drop case must actually drop"


def test_ep2_matches_one_process_dropless_global_balance():
    """EP=2: outputs, input / router / expert gradients, global counts and the bias after 20
    loss-free updates equal one process on the global batch (global-scope aux on)."""
    _check_layer(2, 2, capacity=0.0, aux_scope="global")


def test_ep2_with_drops_matches_per_shard_process():
    """EP=2 with capacity drops (local capacity) equals one process run on each shard."""
    _check_layer(2, 2, capacity=1.0, aux_scope="micro")


@pytest.mark.slow
def test_ep4_matches_one_process():
    """EP=4 (4 ranks) and EP=2 × DP=2 (expert grads reduced over the expert-DP group)."""
    _check_layer(4, 4, capacity=0.0, aux_scope="global")
    _check_layer(4, 2, capacity=0.0, aux_scope="global")
    _check_layer(4, 4, capacity=1.0, aux_scope="micro")


def _composition_worker(rank: int) -> dict:
    """After prepare: what the layer is made of (no class swap, no side-channel attributes)."""
    from moelab.ep import AllToAllDispatcher
    from moelab.parallel import DistributedWorld
    from moelab.runconfig import ParallelConfig

    cfg = _layer_cfg(0.0, "global")
    world = DistributedWorld(ParallelConfig(ep=2, timeout_s=30))
    layer = world.prepare(_model(cfg), cfg)["moe"]
    out = layer(_data(0)[0].chunk(2)[rank])
    return {
        "type": type(layer).__name__,
        "dispatcher": isinstance(layer.dispatcher, AllToAllDispatcher),
        "side_channels": [a for a in ("comm", "_table", "reduce_counts") if hasattr(layer, a)],
        "step_counts": layer.step_counts.clone(),
        "counts": out.counts,
    }


def test_prepare_composes_the_ep_dispatcher_into_a_plain_layer():
    """EP is chosen by the layer's dispatcher: the layer stays a MoELayer with no planted
    attributes, and its step counts are the computation batch's (both ranks)."""
    ranks = values(spawn(2, _composition_worker), 2)
    for r in ranks:
        assert r["type"] == "MoELayer" and r["dispatcher"] and r["side_channels"] == []
        assert torch.equal(r["step_counts"], r["counts"])
        assert int(r["counts"].sum()) == T_GLOBAL * 2  # all tokens of both ranks, top-2


def _quantile_worker(rank: int) -> torch.Tensor:
    """One Quantile Balancing step under EP=2: the bias after end_step."""
    from moelab.parallel import DistributedWorld
    from moelab.runconfig import ParallelConfig

    cfg = dataclasses.replace(_layer_cfg(0.0, "micro"), balance=BalanceConfig(bias_rule="quantile"))
    world = DistributedWorld(ParallelConfig(ep=2, timeout_s=30))
    layer = world.prepare(_model(cfg), cfg)["moe"]
    with torch.no_grad():
        layer(_data(0)[0].chunk(2)[rank])
    layer.end_step()
    return layer.bias.clone()


def test_quantile_prices_are_averaged_over_the_data_ranks():
    """Under EP each rank estimates the prices from its own tokens; the bias after the step
    is minus their mean, the same on every rank (like the loss-free counts)."""
    from moelab import balance as bal

    ranks = values(spawn(2, _quantile_worker), 2)
    cfg = dataclasses.replace(_layer_cfg(0.0, "micro"), balance=BalanceConfig(bias_rule="quantile"))
    layer = _model(cfg)["moe"]
    est = []
    for shard in _data(0)[0].chunk(2):
        with torch.no_grad():
            est.append(bal.quantile_prices(layer.router(shard).scores, torch.zeros(8), 2))
    want = -(est[0] + est[1]) / 2
    for bias in ranks:
        torch.testing.assert_close(bias, want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- failures


def _refusal_worker(rank: int) -> list[str]:
    """Three bad starts in a row; every rank must refuse each with the same clear message."""
    from moelab.parallel import DistributedWorld
    from moelab.runconfig import ParallelConfig

    messages = []
    try:
        DistributedWorld(ParallelConfig(ep=4, timeout_s=20))
    except ValueError as exc:
        messages.append(str(exc))
    world = DistributedWorld(ParallelConfig(ep=2, timeout_s=20))
    cfg = dataclasses.replace(_layer_cfg(0.0, "micro"), num_experts=3, top_k=1)
    try:
        world.prepare(_model(cfg), cfg)
    except ValueError as exc:
        messages.append(str(exc))
    cfg = dataclasses.replace(_layer_cfg(0.0, "micro"), top_k=1 + rank)
    try:
        world.prepare(_model(cfg), cfg)
    except ValueError as exc:
        messages.append(str(exc))
    return messages


def test_bad_layouts_and_mismatched_configs_are_refused_at_start():
    """ep not dividing the world size, ep not dividing E, and configs that differ across
    ranks are refused on every rank with a message naming the cause."""
    for msgs in values(spawn(2, _refusal_worker), 2):
        assert len(msgs) == 3, msgs
        assert "parallel.ep=4 must divide the world size 2" in msgs[0]
        assert "parallel.ep=2 must divide moe.num_experts=3" in msgs[1]
        assert "differs across ranks: ranks [1] differ from rank 0" in msgs[2]
        assert "top_k" in msgs[2]


def _failing_peer_worker(rank: int, mode: str) -> float:
    """Rank 1 dies (exits) or hangs (sleeps); rank 0 runs collectives and reports the error."""
    from moelab.parallel import DistributedWorld
    from moelab.runconfig import ParallelConfig

    world = DistributedWorld(ParallelConfig(ep=2, timeout_s=5))
    world.barrier()
    if rank == 1:
        if mode == "die":
            os._exit(3)
        time.sleep(120)
    t0 = time.monotonic()
    try:
        for _ in range(3):
            world.mean(1.0)
            time.sleep(0.5)
    except RuntimeError as exc:
        raise type(exc)(f"after {time.monotonic() - t0:.1f}s: {exc}") from None
    return time.monotonic() - t0


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_dead_or_hung_peer_fails_with_a_clear_error_within_the_timeout(mode):
    """A peer that exits or hangs makes rank 0 raise DistributedError (naming its rank and
    the operation) within the 5 s timeout instead of hanging."""
    t0 = time.monotonic()
    res = spawn(2, _failing_peer_worker, mode, timeout=60, expect=1)
    status, message = res[0]
    assert status == "error", message
    assert "DistributedError" in message and "rank 0 of 2" in message
    assert "all_reduce of a logged value" in message
    waited = float(message.split("after ")[1].split("s:")[0])
    assert waited < 12, message
    assert time.monotonic() - t0 < 50


# ----------------------------------------------------------------------------- the trainer


def _train_worker(
    rank: int, cfg_dict: dict, out: str, steps: int, resume: bool = False
) -> list[float]:
    from moelab.runconfig import build_config
    from moelab.train import train

    train(build_config(cfg_dict), out, max_steps=steps, resume=resume, progress=False)
    return []


def _losses(out) -> list[float]:
    from moelab.logs import read_rows

    return [r["loss"] for r in read_rows(f"{out}/metrics.jsonl") if "loss" in r]


def _eval_row(out) -> dict:
    from moelab.logs import read_rows

    return [r for r in read_rows(f"{out}/metrics.jsonl") if "val_loss" in r][-1]


TRAIN_SETS = [
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_max_tokens=256",
    "train.tensorboard=false",
    "train.ckpt_every=3",
    "model.moe.balance.bias_rate=0.01",
    "model.moe.balance.aux_coef=0.01",
    "model.moe.balance.aux_scope='global'",
]


def test_training_under_ep2_matches_one_process_and_checkpoints_cross_layouts(micro_cfg, tmp_path):
    """`train()` in 2 ranks with parallel.ep=2 gives the single-process loss curve; only rank 0
    writes, and its summary counts every rank's experts; its EP checkpoint resumes in one
    process exactly like the uninterrupted run."""
    from moelab.config import to_dict
    from moelab.train import train

    steps, evals = 6, "train.eval_max_tokens=768"  # 3 batches per domain: 2 on rank 0, 1 on 1
    cfg1 = micro_cfg(*TRAIN_SETS, evals)
    train(cfg1, tmp_path / "one", max_steps=steps, progress=False)
    cfg2 = micro_cfg(*TRAIN_SETS, evals, "parallel.ep=2", "parallel.timeout_s=60")
    env = {"MOELAB_CACHE": os.environ["MOELAB_CACHE"]}
    ep_out = tmp_path / "ep2"
    values(spawn(2, _train_worker, to_dict(cfg2), str(ep_out), 3, timeout=120, env=env), 2)
    rows = [r for r in map(json.loads, open(ep_out / "metrics.jsonl")) if "loss" in r]
    assert rows[-1]["world_size"] == 2 and len(rows[-1]["rank_load_layers"][0]) == 2
    assert rows[-1]["straggler"] >= 1.0
    assert len(rows[-1]["expert_grad_norm_layers"][0]) == 4
    summary = [json.loads((d / "summary.json").read_text()) for d in (ep_out, tmp_path / "one")]
    for key in ("params", "active_params"):  # the whole model's, not rank 0's expert shard
        assert summary[0][key] == summary[1][key]
    one = _losses(tmp_path / "one")
    torch.testing.assert_close(_losses(ep_out), one[:3], rtol=1e-4, atol=0)
    # Evaluation is split over the ranks and summed: the numbers of one process at step 3.
    train(cfg1, tmp_path / "one3", max_steps=3, progress=False)
    ev_ep, ev_one = (_eval_row(d) for d in (ep_out, tmp_path / "one3"))
    assert ev_ep["counts_layers"] == ev_one["counts_layers"]
    for key in ("val_loss", "maxvio_seq", "mi"):
        assert ev_ep[key] == pytest.approx(ev_one[key], rel=1e-4)
    # The EP=2 checkpoint (single-process layout) resumes in one process.
    train(cfg1, ep_out, resume=True, max_steps=steps, progress=False)
    torch.testing.assert_close(_losses(ep_out), one, rtol=1e-4, atol=0)


@pytest.mark.slow
def test_an_ep2_run_resumed_under_ep2_matches_the_uninterrupted_one(micro_cfg, tmp_path):
    """The lab's torchrun arms (per-rank batches, loss-free bias, EP=2) checkpoint and resume
    in the same layout: 3 steps + 3 resumed = 6 uninterrupted, bit for bit (losses, biases)."""
    from moelab.checkpoint import latest
    from moelab.config import to_dict

    sets = [*TRAIN_SETS, "parallel.ep=2", "parallel.batch='per_rank'", "train.batch_size=2"]
    cfg = to_dict(micro_cfg(*sets, "parallel.timeout_s=60"))
    env = {"MOELAB_CACHE": os.environ["MOELAB_CACHE"]}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    values(spawn(2, _train_worker, cfg, str(whole), 6, timeout=120, env=env), 2)
    values(spawn(2, _train_worker, cfg, str(cut), 3, timeout=120, env=env), 2)
    values(spawn(2, _train_worker, cfg, str(cut), 6, True, timeout=120, env=env), 2)
    assert _losses(cut) == _losses(whole) and len(_losses(whole)) == 6
    a, b = (torch.load(d / latest(d)["file"], weights_only=False)["model"] for d in (whole, cut))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_the_backend_follows_the_run_device():
    """gloo for a CPU run; on CUDA, NCCL for CUDA tensors and gloo for the CPU ones."""
    from moelab.parallel import backend_for

    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "cpu:gloo,cuda:nccl"
