"""Evaluation over the validation split: loss per domain, MaxVio_global, domain→expert MI.

Legend: B sequences, L sequence length, E experts, K top-k, D domains (here only), T = B·L.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab import device, metrics
from moelab.data import Corpus, val_batches
from moelab.host import to_cpu
from moelab.model import MoELM
from moelab.world import LocalWorld, World


@dataclass
class EvalStats:
    """Accumulated evaluation statistics for one pass over the validation split."""

    num_layers: int
    num_experts: int
    num_domains: int
    loss_sum_D: Tensor = field(init=False)
    tokens_D: Tensor = field(init=False)
    joint_lDE: Tensor = field(init=False)  # (layers, D, E) slot counts per domain and expert
    seq_maxvio: Tensor = field(init=False)  # (2,) sum of per-sequence MaxVio, sequences·layers
    next_lEE: Tensor = field(init=False)  # (layers - 1, E, E) top-1 transitions to the next layer

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        dev = self.device
        self.loss_sum_D = torch.zeros(self.num_domains, dtype=torch.float64, device=dev)
        self.tokens_D = torch.zeros(self.num_domains, dtype=torch.int64, device=dev)
        self.joint_lDE = torch.zeros(
            self.num_layers, self.num_domains, self.num_experts, dtype=torch.int64, device=dev
        )
        self.seq_maxvio = torch.zeros(2, dtype=torch.float64, device=dev)
        pairs = max(self.num_layers - 1, 0)
        self.next_lEE = torch.zeros(
            pairs, self.num_experts, self.num_experts, dtype=torch.int64, device=dev
        )

    def reduce(self, sum_: Callable[[Tensor], Tensor]) -> None:
        """Sum every statistic over ranks with ``sum_`` (in place), e.g. ``World.sum_``."""
        for t in (self.loss_sum_D, self.tokens_D, self.joint_lDE, self.seq_maxvio, self.next_lEE):
            sum_(t)

    def to_host(self) -> None:
        """Move every statistic to the CPU (one copy each, after the pass)."""
        for name in ("loss_sum_D", "tokens_D", "joint_lDE", "seq_maxvio", "next_lEE"):
            setattr(self, name, to_cpu(getattr(self, name), f"evaluation {name}"))

    @property
    def counts_lE(self) -> Tensor:
        """(layers, E) slot counts over the whole split."""
        return self.joint_lDE.sum(1)


@torch.no_grad()
def evaluate(
    model: MoELM,
    corpus: Corpus,
    *,
    batch_size: int,
    seq_len: int,
    max_tokens: int = 0,
    world: World | None = None,
) -> dict:
    """Evaluate on every domain's validation split (holdout domains included).

    max_tokens: cap per domain (0 = the whole split). With a ``world`` of W ranks, rank r
    evaluates batches r, r + W, ... of each domain and the statistics are summed over ranks
    (same numbers as one process, W times less work each); a rank without a batch in a round
    runs a discarded forward, so expert-parallel collectives stay in step. Batches move to the
    model's device and the statistics accumulate there (read to the host once, at the end);
    evaluation runs in fp32 whatever ``train.dtype``. Returns a flat dict:
    ``val_loss`` (token-weighted mean over training domains), ``val_loss/<domain>``,
    ``maxvio_global`` (mean over MoE layers of MaxVio of the counts summed over the split; Wang
    et al. 2024), ``maxvio_global_layers``, ``maxvio_seq`` (mean per-sequence MaxVio,
    DeepSeek-V3's sequence view), ``mi`` / ``mi_layers`` (domain→expert mutual information,
    bits), ``counts_layers`` (per-layer expert counts), ``domain_freq_layers``,
    ``next_layer_predict_layers`` / ``next_layer_base_layers`` (how well a token's top-1 expert
    predicts its top-1 in the next MoE layer, and the constant-guess baseline;
    :func:`metrics.next_layer_predictability`) and ``routing_consistency`` /
    ``routing_consistency_layers`` (training vs inference routing of the first validation
    batch, :func:`routing_consistency`).
    """
    check_evaluable(corpus, seq_len=seq_len, max_tokens=max_tokens)
    was_training = model.training
    model.eval()
    layers = model.moe_layers
    E = layers[0].cfg.num_experts if layers else 1
    dev = device.of(model)
    stats = EvalStats(len(layers), E, len(corpus.domains), device=dev)
    world = world or LocalWorld()
    rank, size = world.rank, world.world_size
    for d, name in enumerate(corpus.domains):
        batches = _capped(
            val_batches(corpus, batch_size=batch_size, seq_len=seq_len, domains=[name]), max_tokens
        )
        for i in range(0, len(batches), size):  # one round: a batch per rank
            if i + rank < len(batches):
                b = batches[i + rank]
                _eval_batch(model, b.tokens.to(dev), b.targets.to(dev), d, stats)
            else:  # nothing left here: keep in step with the ranks' collectives
                model(batches[i].tokens.to(dev))
    stats.reduce(world.sum_)
    stats.to_host()
    out = _summarise(stats, corpus)
    if layers:  # every rank probes the same batch, so expert-parallel collectives stay in step
        agree = routing_consistency(model, _probe(corpus, batch_size, seq_len).to(dev))
        out |= {"routing_consistency": _mean(agree), "routing_consistency_layers": agree}
    model.train(was_training)
    return out


def _probe(corpus: Corpus, batch_size: int, seq_len: int) -> Tensor:
    """The first validation batch (B, L) of the first training domain that has one."""
    for name in corpus.domains:
        if name not in corpus.holdout:
            for b in val_batches(corpus, batch_size=batch_size, seq_len=seq_len, domains=[name]):
                return b.tokens
    raise ValueError("no validation batch to probe")  # check_evaluable rules this out


@torch.no_grad()
def routing_consistency(model: MoELM, tokens_BL: Tensor) -> list[float]:
    """Per MoE layer, the share of the inference forward's (token, expert) choices that the
    training forward of the same tokens also makes (:func:`metrics.routing_agreement`): below 1
    wherever training routes differently (router noise, expert masking, soft warm-up), the
    mismatch that routing replay in RL works around. The training forward leaves no trace: the
    RNG state and every balancer buffer are restored, so training goes on exactly as without
    it. The model is left in eval mode."""
    model.eval()
    inference = model(tokens_BL).moe
    saved = [
        {k: b.clone() for k, b in layer.balancer.named_buffers()} for layer in model.moe_layers
    ]
    devices = [tokens_BL.device] if tokens_BL.is_cuda else []
    try:
        with torch.random.fork_rng(devices=devices):  # the RNG state is restored on exit
            training = model.train()(tokens_BL).moe
    finally:
        model.eval()
        for layer, buffers in zip(model.moe_layers, saved, strict=True):
            for k, b in layer.balancer.named_buffers():
                b.copy_(buffers[k])
    E = model.moe_layers[0].cfg.num_experts
    return [
        metrics.routing_agreement(i.experts, t.experts, E, a_mask=i.slot_mask, b_mask=t.slot_mask)
        for i, t in zip(inference, training, strict=True)
    ]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def check_evaluable(corpus: Corpus, *, seq_len: int, max_tokens: int = 0) -> None:
    """Raise ValueError unless an evaluation would see at least one token of a training
    domain: no token is an error, never a perfect ``val_loss`` of 0."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(
            f"max_tokens={max_tokens!r} is out of range; allowed: 0 (the whole split) or a "
            "positive integer"
        )
    sizes = {n: len(corpus.val[n]) for n in corpus.domains if n not in corpus.holdout}
    if not any(size > seq_len for size in sizes.values()):
        raise ValueError(
            f"no validation token to evaluate: every training domain's validation split "
            f"({sizes} tokens) is shorter than data.seq_len + 1 = {seq_len + 1}; lower "
            "data.seq_len, raise data.val_fraction or give more text"
        )


def _capped(batches: Iterable, max_tokens: int) -> list:
    """The batches up to and including the one that reaches ``max_tokens`` (0: all)."""
    out, seen = [], 0
    for b in batches:
        if max_tokens and seen >= max_tokens:
            break
        out.append(b)
        seen += b.tokens.numel()
    return out


def _eval_batch(model: MoELM, tokens_BL: Tensor, targets_BL: Tensor, d: int, s: EvalStats) -> None:
    out = model(tokens_BL)
    logits = out.logits.float().flatten(0, 1)
    loss = torch.nn.functional.cross_entropy(logits, targets_BL.flatten(), reduction="sum")
    s.loss_sum_D[d] += loss  # fp32 sum added in float64, as a Python float would be
    s.tokens_D[d] += targets_BL.numel()
    B, L = tokens_BL.shape
    for i, o in enumerate(out.moe):
        s.joint_lDE[i, d] += metrics.expert_counts(o.experts, s.num_experts, mask=o.slot_mask)
        experts_BLK = o.experts.view(B, L, -1)
        mask_BLK = None if o.slot_mask is None else o.slot_mask.view(B, L, -1)
        seq = metrics.maxvio_per_sequence(experts_BLK, s.num_experts, mask_BL=mask_BLK)
        s.seq_maxvio[0] += seq.sum()
        s.seq_maxvio[1] += seq.numel()
    for i, (a, b) in enumerate(zip(out.moe, out.moe[1:], strict=False)):
        both_T = _top1_valid(a) & _top1_valid(b)
        s.next_lEE[i] += metrics.top1_transitions(
            a.experts, b.experts, s.num_experts, mask_T=both_T
        )


def _top1_valid(o) -> Tensor:
    """(T,) bool: the token's first slot is a real choice (expert choice, null experts)."""
    if o.slot_mask is None:
        return torch.ones(o.experts.shape[0], dtype=torch.bool, device=o.experts.device)
    return o.slot_mask[:, 0]


def _summarise(s: EvalStats, corpus: Corpus) -> dict:
    train_D = torch.tensor([n not in corpus.holdout for n in corpus.domains])
    per_dom = s.loss_sum_D / s.tokens_D.clamp_min(1)
    out: dict = {
        "val_loss": float(s.loss_sum_D[train_D].sum() / s.tokens_D[train_D].sum().clamp_min(1)),
    }
    for name, v, n in zip(corpus.domains, per_dom.tolist(), s.tokens_D.tolist(), strict=True):
        if n:
            out[f"val_loss/{name}"] = v
    if s.num_layers:
        mv = [float(metrics.max_violation(c)) for c in s.counts_lE]
        mi = [metrics.mutual_information_from_joint(j) for j in s.joint_lDE]
        out |= {
            "maxvio_global": sum(mv) / len(mv),
            "maxvio_global_layers": mv,
            "maxvio_seq": float(s.seq_maxvio[0] / s.seq_maxvio[1].clamp_min(1)),
            "mi": sum(mi) / len(mi),
            "mi_layers": mi,
            "counts_layers": s.counts_lE.tolist(),
            "domain_freq_layers": (
                s.joint_lDE.double() / s.joint_lDE.sum(-1, keepdim=True).clamp_min(1)
            ).tolist(),
        }
        pred = [metrics.next_layer_predictability(t) for t in s.next_lEE]
        out["next_layer_predict_layers"] = [p for p, _ in pred]
        out["next_layer_base_layers"] = [b for _, b in pred]
    return out
