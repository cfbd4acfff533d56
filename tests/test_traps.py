"""The balancing traps users of MoE frameworks keep hitting (issue 19), one specification each.

They cut across modules (the model's activation checkpointing, the step's gradient
accumulation, the Balancer's terms and bias rules), so they live together here:
- activation checkpointing must not double the counts feeding the loss-free bias or the
  global aux loss (torchtitan#4772);
- the sequence-level loss must not scale with the micro-batch size (Megatron-LM#5798);
- the sigmoid score normalisation must not be gameable through an epsilon (Megatron-LM#1545);
- re-centring the bias must never change a selection (torchtitan#1506).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from moelab import balance as bal
from moelab.balancer import TERMS, BalanceInputs, Balancer
from moelab.config import BalanceConfig
from moelab.data import Batcher, load_corpus
from moelab.dispatch import routed_counts
from moelab.model import MoELM
from moelab.routing import route
from moelab.step import train_step
from moelab.train import build_model
from moelab.world import LocalWorld

# ----------------------------------------------------------------------------- checkpointing


def _step_state(cfg, corpus, batch, n_micro: int, ac: bool, early_stop: bool = True):
    """Forward/backward over n_micro micro-batches as the trainer does; the balancers'
    accumulated counts, the losses and the router gradients, before ``end_step``.
    early_stop=False makes the recompute run each block to its end (torch otherwise stops it
    once the saved tensors are back, which can hide a count at the end of the layer)."""
    cfg, model = build_model(cfg, corpus)
    model = MoELM(model.cfg, activation_checkpointing=ac).train()
    torch.manual_seed(7)  # router jitter draws the same noise in both runs
    losses = []
    for mb in batch.split(n_micro):
        out = model(mb.tokens, mb.targets)
        with set_checkpoint_early_stop(early_stop):
            ((out.loss + out.aux) / n_micro).backward()
        losses.append(float((out.loss + out.aux).detach()))
    counts = [layer.step_counts.clone() for layer in model.moe_layers]
    grads = [layer.router.weight.grad.clone() for layer in model.moe_layers]
    return model, counts, losses, grads


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("rule", ["sign", "multiplicative", "quantile"])
def test_activation_checkpointing_counts_each_token_once(micro_cfg, rule, early_stop):
    """With train.activation_checkpointing the block recompute in the backward pass adds
    nothing to the step's counts (loss-free bias, Quantile prices) and the global-scope aux
    loss sees the same counts, so counts, losses, router gradients and the next bias equal
    those of the run without it (torchtitan#4772)."""
    rate = "0.0" if rule == "quantile" else "0.01"
    cfg = micro_cfg(
        f"model.moe.balance.bias_rate={rate}",
        f"model.moe.balance.bias_rule='{rule}'",
        "model.moe.balance.aux_coef=0.1",
        "model.moe.balance.aux_scope='global'",
        "model.moe.router.noise='jitter'",
    )
    corpus = load_corpus(cfg.data)
    batch = Batcher(corpus, batch_size=8, seq_len=cfg.data.seq_len).batch_at(0)
    plain, ckpt = (_step_state(cfg, corpus, batch, 2, ac, early_stop) for ac in (False, True))
    for a, b in zip(plain[1], ckpt[1], strict=True):
        assert torch.equal(a, b)
    assert plain[1][0].sum() == 8 * cfg.data.seq_len * 2  # T·K slots, counted once
    assert plain[2] == pytest.approx(ckpt[2], rel=1e-6)
    for a, b in zip(plain[3], ckpt[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    plain[0].end_step(30)
    ckpt[0].end_step(30)
    for a, b in zip(plain[0].moe_layers, ckpt[0].moe_layers, strict=True):
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-6, atol=1e-7)


def test_activation_checkpointing_is_a_train_setting_that_keeps_the_step(micro_cfg):
    """train.activation_checkpointing reaches the model and one optimizer step with it gives
    the losses of the step without it."""
    cfg = micro_cfg("model.moe.balance.aux_coef=0.01", "train.micro_batch_size=4")
    corpus = load_corpus(cfg.data)
    batch = Batcher(corpus, batch_size=8, seq_len=cfg.data.seq_len).batch_at(0)
    results = []
    for ac in (False, True):
        c = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=ac)
        )
        c, model = build_model(c, corpus)
        assert model.activation_checkpointing is ac
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        results.append(train_step(model, opt, batch.split(2), c, LocalWorld(), 0))
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-6)
    assert results[0].grad_norm == pytest.approx(results[1].grad_norm, rel=1e-5)


# ----------------------------------------------------------------------------- sequence loss


class _Record(torch.optim.Optimizer):
    """An optimizer that only records the gradients it is asked to apply."""

    def __init__(self, params) -> None:
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None) -> None:
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def test_sequence_loss_does_not_scale_with_the_micro_batch_size(micro_cfg):
    """One optimizer step over 8 sequences gives the same logged aux and the same gradients
    whether it runs as 1, 2, 4 or 8 micro-batches: the sequence-wise loss is a mean over
    sequences, and the trainer averages the micro-batches (Megatron-LM#5798: a 1/MBS factor
    in its gradient silently weakened balancing as the micro-batch grew)."""
    cfg = micro_cfg("model.moe.balance.seq_aux_coef=1.0", "train.grad_clip=0.0")
    corpus = load_corpus(cfg.data)
    batch = Batcher(corpus, batch_size=8, seq_len=cfg.data.seq_len).batch_at(0)
    runs = []
    for n_micro in (1, 2, 4, 8):
        c, model = build_model(cfg, corpus)
        opt = _Record(model.parameters())
        r = train_step(model, opt, batch.split(n_micro), c, LocalWorld(), 0)
        router = [n for n, _ in model.named_parameters()].index("blocks.0.ffn.router.weight")
        runs.append((r.aux, opt.grads[router]))
    assert runs[0][0] > 0.5  # about 1 at balance: the term is on and unscaled
    for aux, grad_DE in runs[1:]:
        assert aux == pytest.approx(runs[0][0], rel=1e-5)
        torch.testing.assert_close(grad_DE, runs[0][1], rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- sigmoid epsilon

# Terms that read the per-token distribution of the scores (balance.score_distribution):
# not z (logits), nor those on gates, learned noise or the router weight.
DIST_TERMS = [t for t in TERMS if t.name != "z" and not {"gates", "noise", "router"} & set(t.needs)]


@pytest.mark.parametrize("score", ["sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize("term", DIST_TERMS, ids=lambda t: t.name)
def test_no_term_can_be_lowered_by_shrinking_every_score(score, term):
    """Every balance term computed from non-softmax scores is invariant to scaling all
    scores: the same value at s and at 1e-6·s, and zero gradient along the scale, so a
    router cannot lower it by shrinking every score (an ε in s/(Σs + ε) allows it,
    Megatron-LM#1545)."""
    T, E, K, L = 24, 8, 2, 6
    g = torch.Generator().manual_seed(3)
    r = route(torch.randn(T, E, generator=g), K, score=score)
    counts_E = routed_counts(r.experts, None, E)
    cfg = BalanceConfig(**{term.coef: 1.0, "num_devices": 2})
    b = Balancer(cfg, num_experts=E, top_k=K, score=score)

    def loss(scale: torch.Tensor) -> torch.Tensor:
        x = BalanceInputs(
            dataclasses.replace(r, scores=r.scores * scale),
            counts_E,
            counts_E,
            True,
            seq_len=L,
            capacity=4,
        )
        return b.losses(x)[term.name]

    scale = torch.tensor(1.0, requires_grad=True)
    value = loss(scale)
    (grad,) = torch.autograd.grad(value, scale)
    assert float(value) > 0
    assert float(loss(torch.tensor(1e-6))) == pytest.approx(float(value), rel=1e-5)
    assert abs(float(grad)) < 1e-5 * float(value)
    eps_TE = r.scores * 1e-8 / (r.scores.sum(-1, keepdim=True) * 1e-8 + 1e-6)
    assert float(bal.switch_loss(eps_TE, r.experts, E)) < 0.1  # what an ε would allow


# ----------------------------------------------------------------------------- re-centring


def _trajectory(cfg, corpus, batcher, center: bool, steps: int = 12):
    """Train ``steps`` steps (bias_center on or off): each step's chosen experts, loss, bias."""
    c = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model,
            moe=dataclasses.replace(
                cfg.model.moe,
                balance=dataclasses.replace(cfg.model.moe.balance, bias_center=center),
            ),
        ),
    )
    c, model = build_model(c, corpus)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    for step in range(steps):
        r = train_step(model, opt, batcher.batch_at(step).split(1), c, LocalWorld(), step)
        with torch.no_grad():
            experts = [o.experts for o in model(batcher.batch_at(step).tokens).moe]
        out.append((experts, r.loss, [layer.bias.clone() for layer in model.moe_layers]))
    return out


@pytest.mark.parametrize(
    "sets",
    [
        ["model.moe.balance.bias_rate=0.05"],
        ["model.moe.balance.bias_rate=0.05", "model.moe.balance.bias_rule='proportional'"],
        ["model.moe.balance.bias_rate=0.05", "model.moe.balance.bias_rule='multiplicative'"],
        ["model.moe.balance.bias_rule='quantile'"],
        ["model.moe.balance.bias_rule='quantile'", "model.moe.balance.quantile_ema=0.5"],
        [
            "model.moe.balance.bias_rate=0.05",
            "model.moe.router.score='sigmoid'",
            "model.moe.router.num_groups=2",
            "model.moe.router.topk_groups=1",
        ],
    ],
    ids=["sign", "proportional", "multiplicative", "quantile", "quantile-ema", "groups"],
)
def test_recentring_the_bias_never_changes_a_selection(micro_cfg, sets):
    """bias_center only moves the bias by a constant: every step's selections and losses
    are those of the run without it, and the two biases differ by a constant (torchtitan#1506:
    the re-centring keeps the mean at 0 and must not change which experts are chosen)."""
    cfg = micro_cfg("model.moe.num_experts=8", *sets)
    corpus = load_corpus(cfg.data)
    batcher = Batcher(corpus, batch_size=8, seq_len=cfg.data.seq_len)
    plain, centred = (_trajectory(cfg, corpus, batcher, c) for c in (False, True))
    if "proportional" not in sets[-1]:  # Σ_i (mean − c_i)/mean = 0: that rule keeps the mean
        assert max(float(b[0].mean().abs()) for _, _, b in plain) > 1e-3  # centring moves it
    for (e0, loss0, b0), (e1, loss1, b1) in zip(plain, centred, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(e0, e1, strict=True))
        assert loss0 == loss1
        for a_E, b_E in zip(b0, b1, strict=True):
            assert float(b_E.mean().abs()) < 1e-6
            torch.testing.assert_close(a_E - a_E.mean(), b_E, rtol=0, atol=1e-6)
