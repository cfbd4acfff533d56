"""Load a trained run back and look inside it: the model, its corpus, per-token routing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moelab import checkpoint
from moelab import device as dev_mod
from moelab.data import Corpus, load_corpus
from moelab.model import MoELM


@dataclass
class TrainedRun:
    """A model restored from a checkpoint with the corpus (tokenizer) it was trained on."""

    cfg: Any  # RunConfig
    model: MoELM
    corpus: Corpus
    step: int


def load_trained(
    path: str | Path, data: list[str] | None = None, *, device: str | None = "cpu"
) -> TrainedRun:
    """Restore the model of a run folder or checkpoint file (saved on any device), in eval
    mode, on ``device`` (a ``train.device`` value; None: the checkpoint's own
    ``train.device``, as ``moelab eval`` and ``route`` do without ``--device``).

    data: evaluate on other text (the tokenizer is retrained only if the sources differ, so
    prefer the run's own data; other text changes the vocabulary and is refused).
    """
    from moelab.runconfig import build_config

    state = checkpoint.load(path)
    cfg = build_config(state["config"])
    if device is None:
        dev = dev_mod.resolve(cfg.train.device, "the checkpoint's train.device (see --device)")
    else:
        dev = dev_mod.resolve(device, "--device")
    corpus = load_corpus(cfg.data)
    if data:
        other = load_corpus(dataclasses.replace(cfg.data, sources=tuple(data)))
        if other.tokenizer.to_str() != corpus.tokenizer.to_str():
            corpus = _with_tokenizer(other, corpus)
        else:
            corpus = other
    model = MoELM(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise checkpoint.CheckpointError(
            f"checkpoint {str(path)!r} does not match its config: {str(exc).splitlines()[0]}"
        ) from exc
    model.to(dev).eval()
    return TrainedRun(cfg, model, corpus, int(state["step"]))


def _with_tokenizer(other: Corpus, trained: Corpus) -> Corpus:
    """Re-encode another corpus's text with the trained tokenizer."""
    import numpy as np

    def enc(arr):
        return np.asarray(trained.encode(other.decode(arr)), dtype=np.int64)

    return Corpus(
        other.domains,
        trained.tokenizer,
        {k: enc(v) for k, v in other.train.items()},
        {k: enc(v) for k, v in other.val.items()},
        tuple(other.train),  # none of it was trained on
    )


@torch.no_grad()
def route_text(run: TrainedRun, text: str) -> dict[str, Any]:
    """Which experts each token goes to, per MoE layer.

    Returns ``{"tokens": [str, ...], "layers": [[[e1, e2], ...] per token] per layer,
    "weights": same shape with gate weights}``.
    """
    ids = run.corpus.encode(text)
    if not ids:
        raise ValueError("--text is empty after tokenisation; give some text")
    ids = ids[: run.cfg.model.max_seq_len]
    out = run.model(torch.tensor([ids], device=dev_mod.of(run.model)))
    return {
        "tokens": [run.corpus.decode([i]) for i in ids],
        "layers": [o.experts.tolist() for o in out.moe],
    }
