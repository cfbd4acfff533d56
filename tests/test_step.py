"""Specification tests for moelab.step: one optimizer step and the LR schedule."""

from __future__ import annotations

import pytest
import torch

from moelab.data import Batcher, load_corpus
from moelab.step import lr_at, train_step
from moelab.train import build_model
from moelab.world import LocalWorld


def test_gradient_accumulation_matches_one_big_batch(micro_cfg):
    """Two micro-batches of 4 give the same loss and gradients as one batch of 8
    (micro-batch scope aux off, so the only difference is summation order)."""
    cfg = micro_cfg("model.moe.balance.aux_coef=0.0")
    corpus = load_corpus(cfg.data)
    batch = Batcher(corpus, batch_size=8, seq_len=cfg.data.seq_len).batch_at(0)
    grads = []
    for n_micro in (1, 2):
        cfg2, model = build_model(cfg, corpus)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        r = train_step(model, opt, batch.split(n_micro), cfg2, LocalWorld(), 0)
        grads.append((r.loss, [p.detach().clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)


def test_lr_schedule_warmup_then_cosine(micro_cfg):
    """Linear warm-up reaches lr, cosine decays to lr·min_lr_ratio at the last step."""
    t = micro_cfg().train
    assert lr_at(t.warmup_steps - 1, t) == pytest.approx(t.lr)
    assert lr_at(t.steps, t) == pytest.approx(t.lr * t.min_lr_ratio)
