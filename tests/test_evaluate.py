"""Specification of moelab.evaluate's guard: an evaluation over no token is an error."""

import json

import numpy as np
import pytest
import torch

from moelab.data import Corpus
from moelab.evaluate import check_evaluable
from moelab.train import train


def _corpus(**val_sizes: int) -> Corpus:
    val = {n: np.arange(k, dtype=np.uint16) for n, k in val_sizes.items()}
    return Corpus(list(val), None, {}, val, holdout=("held",) if "held" in val else ())


def test_no_validation_window_is_an_error_not_a_perfect_score():
    """A training domain needs seq_len + 1 validation tokens for one window; a holdout domain
    does not count (val_loss is over training domains); negative max_tokens is refused."""
    check_evaluable(_corpus(a=33), seq_len=32)
    with pytest.raises(ValueError, match=r"shorter than data.seq_len \+ 1 = 33"):
        check_evaluable(_corpus(a=32, held=1000), seq_len=32)
    with pytest.raises(ValueError, match="max_tokens=-1 is out of range"):
        check_evaluable(_corpus(a=100), seq_len=32, max_tokens=-1)


def test_a_run_without_validation_text_fails_before_training(micro_cfg, tmp_path):
    """A validation split shorter than one window fails before the first step (no metrics
    written), not after the whole run with val_loss 0.0."""
    text = tmp_path / "small.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    cfg = micro_cfg(f"data.sources=['{text}']", "data.domains=[]", "data.val_fraction=0.005")
    with pytest.raises(ValueError, match="no validation token to evaluate"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_routing_consistency_and_next_layer_predictability_are_reported(micro_cfg, tmp_path):
    """evaluate reports training-vs-inference routing consistency (1.0 without training-only
    randomness, below 1 with router jitter and expert masking) and next-layer predictability;
    the probe's training forward changes nothing: a run that evaluates every step trains to
    the same losses as one that does not."""
    from moelab.logs import read_rows

    sets = ["train.steps=3", "train.log_every=1", "model.moe.router.noise='jitter'",
            "model.moe.router.noise_std=0.5", "model.moe.router.expert_mask_prob=0.3",
            "model.moe.balance.bias_rate=1e-3"]  # fmt: skip
    train(micro_cfg(*sets, "train.eval_every=1"), tmp_path / "a", progress=False)
    train(micro_cfg(*sets, "train.eval_every=0"), tmp_path / "b", progress=False)
    rows = {p: read_rows(tmp_path / p / "metrics.jsonl") for p in ("a", "b")}
    losses = {p: [r["loss"] for r in rs if "loss" in r] for p, rs in rows.items()}
    assert losses["a"] == losses["b"]
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert all(0 < c < 1 for c in summary["routing_consistency_layers"])
    assert len(summary["next_layer_predict_layers"]) == 1  # micro: 2 MoE layers
    acc, base = summary["next_layer_predict_layers"][0], summary["next_layer_base_layers"][0]
    assert 0 < base <= acc <= 1
    plain = micro_cfg("train.steps=1")
    train(plain, tmp_path / "c", progress=False)
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["routing_consistency_layers"] == [1.0, 1.0]


@pytest.mark.cuda
def test_evaluation_on_cuda_equals_the_cpu(micro_cfg):
    """evaluate on a model moved to CUDA (batches follow it, statistics accumulate there) gives
    the CPU's losses to 1e-5 and its expert counts but for near-tied choices (<= 0.5 %)."""
    from moelab.data import load_corpus
    from moelab.evaluate import evaluate
    from moelab.train import build_model

    cfg = micro_cfg()
    corpus = load_corpus(cfg.data)
    cfg, model = build_model(cfg, corpus)
    kw = dict(batch_size=8, seq_len=cfg.data.seq_len, max_tokens=1024)
    cpu = evaluate(model, corpus, **kw)
    cuda = evaluate(model.to("cuda"), corpus, **kw)
    got, want = torch.tensor(cuda["counts_layers"]), torch.tensor(cpu["counts_layers"])
    assert float((got - want).abs().sum()) <= 0.005 * float(want.sum())
    assert cuda["val_loss"] == pytest.approx(cpu["val_loss"], rel=1e-5)
