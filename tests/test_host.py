"""Specification of moelab.host: device -> host reads are counted, and the training step reads
a fixed number of them however many MoE layers the model has (the rule a GPU needs, checked
on the CPU by counting the reads instead of timing a device)."""

from __future__ import annotations

import pytest
import torch

from moelab import experts as experts_mod
from moelab import host
from moelab.data import Batcher, load_corpus
from moelab.step import train_step
from moelab.train import build_model
from moelab.world import LocalWorld


def test_reads_are_counted_with_their_labels():
    """to_host / to_cpu give the values and each adds one labelled read to every open counter."""
    with host.count_reads() as outer:
        assert host.to_host(torch.tensor(3), "a") == 3
        with host.count_reads() as inner:
            assert host.to_host(torch.tensor([1.5, 2.0]), "b") == [1.5, 2.0]
            assert torch.equal(host.to_cpu(torch.ones(2), "c"), torch.ones(2))
    assert (outer.reads, outer.labels) == (3, ["a", "b", "c"])
    assert (inner.reads, inner.labels) == (2, ["b", "c"])
    assert host.to_host(torch.tensor(1.0)) == 1.0  # no counter open: still a plain read


def test_deferred_finite_checks_record_flags_under_their_label():
    """Inside deferred_finite_checks all_finite reads nothing and records a flag per check,
    labelled by the check_label in force; outside it reads at once."""
    bad = torch.tensor([1.0, float("nan")])
    with host.count_reads() as c, host.deferred_finite_checks() as checks:
        assert host.all_finite(bad, "x")  # recorded, not read: True for now
        with host.check_label(3):
            host.all_finite(torch.ones(2), "y")
            host.all_finite(bad, "z")
    assert c.reads == 0
    assert [label for label, _ in checks.flags] == [None, 3, 3]
    values = [bool(f) for _, f in checks.flags]
    assert checks.failed(values) == [None, 3]
    assert not host.deferring() and not host.all_finite(bad, "now")


def _model_and_batch(micro_cfg, n_layers: int, *sets: str):
    cfg = micro_cfg(f"model.n_layers={n_layers}", *sets)
    corpus = load_corpus(cfg.data)
    cfg, model = build_model(cfg, corpus)
    batch = Batcher(corpus, batch_size=8, seq_len=cfg.data.seq_len).batch_at(0)
    return cfg, model, batch


SETS = (
    "model.d_model=32",
    "model.moe.d_expert=32",  # 16-byte aligned rows: the grouped GEMM path runs
    "model.moe.balance.bias_rate=0.01",
    "model.moe.balance.aux_coef=0.01",
    "model.moe.balance.aux_scope='global'",
    "model.moe.router.noise='jitter'",
)


@pytest.mark.parametrize("n_layers", [2, 4])
def test_a_training_step_reads_the_host_twice_whatever_the_layers(micro_cfg, monkeypatch, n_layers):
    """With experts on grouped GEMM (as on CUDA), an unlogged step with two micro-batches, the
    loss-free bias and global-scope aux on makes exactly two host reads: the losses with the
    deferred router checks, and the gradient norm; none per layer or micro-batch."""
    monkeypatch.setattr(experts_mod, "GROUPED_MM", "on")
    cfg, model, batch = _model_and_batch(micro_cfg, n_layers, *SETS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, batch.split(2), cfg, LocalWorld(), 0)  # first: progress read once
    with host.count_reads() as c:
        r = train_step(model, opt, batch.split(2), cfg, LocalWorld(), 1)
    assert c.labels == ["step losses", "gradient norm"]
    with host.count_reads() as c:  # what the logger reads, on logged steps only
        assert len(r.z) == n_layers and r.dropped == 0
    assert c.reads == 2


def test_the_per_expert_path_reads_its_split_sizes(micro_cfg, monkeypatch):
    """The CPU path (per-expert matmuls) needs each layer's split sizes on the host: one read
    per layer and micro-batch, named, so the count above is the grouped path's own."""
    monkeypatch.setattr(experts_mod, "GROUPED_MM", "off")
    cfg, model, batch = _model_and_batch(micro_cfg, 2, *SETS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, batch.split(2), cfg, LocalWorld(), 0)
    with host.count_reads() as c:
        train_step(model, opt, batch.split(2), cfg, LocalWorld(), 1)
    assert c.labels.count("expert segment sizes") == 2 * 2
