"""Specification of moelab.evaluate's guard: an evaluation over no token is an error."""

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
