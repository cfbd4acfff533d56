"""moelab.balancer: the term table against the pure functions of moelab.balance, the step
update (bias, adaptive λ per layer), the owner API (reset_step, stats, state), the one
sequence-loss setting and the refused bias, and the same Balancer under the LM and HF paths."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch

import moelab
from moelab import balance as bal
from moelab import dispatch, metrics
from moelab.balancer import TERMS, BalanceInputs, Balancer, active_terms
from moelab.config import BalanceConfig, CapacityConfig, MoEConfig, RouterConfig
from moelab.routing import relu_route, route

D, E, K, T = 16, 8, 2, 24


def _inputs(seed: int = 0, *, training: bool = True, score: str = "softmax") -> BalanceInputs:
    g = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=g).requires_grad_()
    r = route(logits_TE, K, score=score)
    counts_E = dispatch.routed_counts(r.experts, None, E)
    router_ED = torch.randn(E, D, generator=g).requires_grad_()
    return BalanceInputs(
        r, counts_E, counts_E, training, seq_len=6, capacity=4, router_ED=router_ED
    )


def _coef_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(BalanceConfig) if f.name.endswith("_coef")}


def test_every_coefficient_has_exactly_one_table_row():
    """Adding a term is one field + one row: each *_coef field of BalanceConfig names one row,
    each row a real field, each name is unique."""
    assert sorted(t.coef for t in TERMS) == sorted(_coef_fields())
    assert len({t.name for t in TERMS}) == len(TERMS)


# Each term against a direct call of its pure function (coefficient 0.5).
REFERENCES = {
    "simbal": lambda x, p: bal.simbal_loss(x.router_ED),
    "aux": lambda x, p: bal.switch_loss_from_stats(counts=x.counts_E, probs=p.mean(0)),
    "seq_aux": lambda x, p: bal.sequence_switch_loss(
        p.view(-1, 6, E), x.routing.experts.view(-1, 6, K), E
    ),
    "device": lambda x, p: bal.device_loss(counts=x.counts_E, probs=p.mean(0), num_devices=2),
    "comm": lambda x, p: bal.comm_loss(
        device_hits=bal.device_hits(x.routing.experts, E, 2),
        probs=p.mean(0),
        num_devices=2,
        max_devices=2,
    ),
    "importance": lambda x, p: bal.importance_loss(x.routing.weights, x.routing.experts, E),
    "z": lambda x, p: bal.z_loss(x.routing.logits),
    "entropy": lambda x, p: bal.token_entropy_loss(p),
    "batch_entropy": lambda x, p: bal.batch_entropy_loss(p),
    "overflow": lambda x, p: bal.overflow_loss(counts=x.counts_E, probs=p.mean(0), capacity=4),
}


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_each_term_is_its_coefficient_times_its_pure_function(name, score):
    """losses[name] == coef · balance.<fn>(...) for the routing, counts and sequence shape."""
    term = next(t for t in TERMS if t.name == name)
    cfg = BalanceConfig(**{term.coef: 0.5, "num_devices": 2})
    x = _inputs(score=score)
    got = Balancer(cfg, num_experts=E, top_k=K, score=score).losses(x)
    p_TE = bal.score_distribution(x.routing.scores, score)
    assert set(got) == {name}
    torch.testing.assert_close(got[name], 0.5 * REFERENCES[name](x, p_TE), rtol=0, atol=0)


def test_global_scope_adds_the_steps_counts_in_training_only():
    """aux_scope='global': counts = step_counts + batch counts in training, batch counts in eval."""
    b = Balancer(BalanceConfig(aux_coef=1.0, aux_scope="global"), num_experts=E, top_k=K)
    x = _inputs()
    b.count(x.batch_E)
    b.count(x.batch_E)
    p_E = x.routing.scores.mean(0)
    train = bal.switch_loss_from_stats(counts=3 * x.batch_E, probs=p_E)
    torch.testing.assert_close(b.losses(x)["aux"], train)
    evaluated = dataclasses.replace(x, training=False)
    torch.testing.assert_close(
        b.losses(evaluated)["aux"], bal.switch_loss_from_stats(counts=x.batch_E, probs=p_E)
    )


def test_sequence_terms_are_left_out_without_a_sequence_shape():
    """seq_aux needs whole sequences: seq_len None or not dividing T leaves it out."""
    b = Balancer(BalanceConfig(seq_aux_coef=1.0), num_experts=E, top_k=K)
    assert set(b.losses(dataclasses.replace(_inputs(), seq_len=None))) == set()
    assert set(b.losses(dataclasses.replace(_inputs(), seq_len=5))) == set()
    assert set(b.losses(_inputs())) == {"seq_aux"}


def test_adaptive_target_switches_the_aux_term_on_with_a_live_coefficient():
    """adaptive_target > 0 puts 'aux' in the active terms even at aux_coef 0, weighted by the
    live buffer aux_coef (which end_step moves within [adaptive_min, adaptive_max])."""
    cfg = BalanceConfig(adaptive_target=0.1, adaptive_rate=1.0, adaptive_min=0.01)
    assert [t.name for t in active_terms(cfg)] == ["aux"]
    b = Balancer(cfg, num_experts=E, top_k=K)
    b.count(torch.tensor([9, 1, 1, 1, 1, 1, 1, 1]))
    b.end_step()
    assert float(b.aux_coef) == pytest.approx(0.01)  # 0·2 clamped up to adaptive_min
    x = _inputs()
    ref = bal.switch_loss_from_stats(counts=x.counts_E, probs=x.routing.scores.mean(0))
    torch.testing.assert_close(b.losses(x)["aux"], b.aux_coef * ref)


def test_end_step_updates_the_bias_by_the_rule_and_resets_the_counts():
    """The sign rule of Wang et al. 2024 Alg. 1 from the accumulated counts; a step without
    counts moves nothing but progress; reset_step drops the counts."""
    b = Balancer(BalanceConfig(bias_rate=0.1), num_experts=4, top_k=1)
    b.count(torch.tensor([5, 1, 1, 1]))
    b.count(torch.tensor([3, 1, 0, 0]))
    b.end_step()
    ref = bal.update_bias(torch.zeros(4), torch.tensor([8, 2, 1, 1]), 0.1, "sign")
    assert torch.equal(b.bias, ref) and int(b.step_counts.sum()) == 0 and int(b.progress) == 1
    b.end_step()
    assert torch.equal(b.bias, ref) and int(b.progress) == 2
    b.count(torch.tensor([1, 2, 3, 4]))
    b.reset_step()
    assert int(b.step_counts.sum()) == 0


def test_stats_report_the_bias_and_the_live_coefficient():
    b = Balancer(BalanceConfig(aux_coef=0.25), num_experts=4, top_k=1)
    with torch.no_grad():
        b.bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))
    assert b.stats() == {"bias_absmean": 0.3125, "bias_range": 1.0, "aux_coef": 0.25}


def test_selection_bias_only_when_the_bias_moves():
    off = Balancer(BalanceConfig(), num_experts=4, top_k=1)
    on = Balancer(BalanceConfig(bias_rate=1e-3), num_experts=4, top_k=1)
    assert off.selection_bias() is None and on.selection_bias() is on.bias


# ----------------------------------------------------------------------------- config spellings


def test_aux_scope_sequence_is_the_old_spelling_of_seq_aux_coef():
    """aux_coef=c with aux_scope='sequence' reads as seq_aux_coef=c: one sequence loss, under
    the key 'seq_aux', computed once."""
    old = BalanceConfig(aux_coef=0.3, aux_scope="sequence")
    assert old == BalanceConfig(seq_aux_coef=0.3)
    layer = moelab.MoELayer(MoEConfig(D, E, K, 12, balance=old))
    assert set(layer(torch.randn(2, 6, D)).losses) == {"seq_aux"}


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(aux_coef=0.1, aux_scope="sequence", seq_aux_coef=1e-4), "both set"),
        (dict(aux_coef=0.1, aux_scope="sequence", adaptive_target=0.5), "adaptive"),
    ],
)
def test_two_spellings_of_the_sequence_loss_are_refused(kw, words):
    with pytest.raises(ValueError, match=words) as info:
        BalanceConfig(**kw)
    assert "balance.aux_scope" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("method", ["sinkhorn", "expert_choice", "hash", "random", "uniform"])
def test_a_bias_on_a_method_that_ignores_it_is_refused(method):
    """balance.bias_rate > 0 with a method whose selection ignores the bias: a one-line
    ValueError naming both fields, from the run config and from the layer."""
    cfg = MoEConfig(
        D, E, K, 12, router=RouterConfig(method=method), balance=BalanceConfig(bias_rate=1e-3)
    )
    with pytest.raises(ValueError, match="balance.bias_rate.*router.method") as info:
        moelab.MoELayer(cfg)
    assert "\n" not in str(info.value)
    from moelab.runconfig import build_config

    sets = [f"model.moe.router.method='{method}'", "model.moe.balance.bias_rate=0.001"]
    with pytest.raises(ValueError, match="balance.bias_rate.*router.method"):
        build_config({}, sets)


def test_score_functions_are_defined_once():
    """config.ScoreFn lists them; routing.SCORE_FNS gives each its formula."""
    from moelab.config import ScoreFn
    from moelab.routing import SCORE_FNS

    assert set(typing.get_args(ScoreFn)) == set(SCORE_FNS)


# ----------------------------------------------------------------------------- in the layer


def test_layer_state_keys_stay_flat_and_old_checkpoints_load():
    """The balancer's buffers are saved under the layer's own keys, in the order they had
    before the Balancer existed; such a state dict loads back into the balancer."""
    torch.manual_seed(0)
    layer = moelab.MoELayer(MoEConfig(D, E, K, 12, balance=BalanceConfig(bias_rate=0.1)))
    keys = list(layer.state_dict())
    assert keys[:4] == ["bias", "step_counts", "progress", "aux_coef"]
    assert not any(k.startswith("balancer.") for k in keys)
    state = layer.state_dict()
    state["bias"] = torch.arange(E, dtype=torch.float32)
    state["progress"] = torch.tensor(7)
    other = moelab.MoELayer(MoEConfig(D, E, K, 12, balance=BalanceConfig(bias_rate=0.1)))
    other.load_state_dict(state)
    assert torch.equal(other.balancer.bias, state["bias"]) and int(other.balancer.progress) == 7


def test_the_layer_uses_the_dispatchers_counts_for_the_global_loss():
    """The dispatcher chosen at construction gives the computation batch's counts: a fake
    one that says 'another rank routed the same again' doubles them in the global loss and
    in the step counts, with the output unchanged."""

    class TwoRanks(dispatch.LocalDispatcher):
        def load(self, routed_E, prices_E=None):
            return dispatch.Load(2 * routed_E)

        def combine(self, x_TD, p, experts, load):
            done = super().combine(x_TD, p, experts, load)
            return dataclasses.replace(done, routed_E=load.batch_E, kept_E=2 * p.kept_E)

    cfg = MoEConfig(D, E, K, 12, balance=BalanceConfig(aux_coef=1.0, aux_scope="global"))
    torch.manual_seed(0)
    plain = moelab.MoELayer(cfg)
    torch.manual_seed(0)
    fake = moelab.MoELayer(cfg, dispatcher=TwoRanks())
    x = torch.randn(12, D)
    a, b = plain(x), fake(x)
    torch.testing.assert_close(a.output, b.output, rtol=0, atol=0)
    assert torch.equal(b.counts, 2 * a.counts) and torch.equal(fake.step_counts, 2 * a.counts)
    assert int(b.dropped) == 0
    # Switch loss is scale-free in the counts: doubling all of them leaves it unchanged.
    torch.testing.assert_close(a.losses["aux"], b.losses["aux"], rtol=0, atol=0)


def test_the_local_dispatcher_equals_permute_experts_unpermute():
    """LocalDispatcher.combine == unpermute(experts(permute(x))) with the plan's counts."""
    torch.manual_seed(0)
    layer = moelab.MoELayer(
        MoEConfig(D, E, K, 12, router=RouterConfig(init_std=0.5), capacity=CapacityConfig(1.0))
    )
    x_TD = torch.randn(20, D)
    r = layer.router(x_TD)
    p = dispatch.plan(r.experts, r.weights, E, capacity=dispatch.capacity(20, K, E, 1.0))
    done = dispatch.LocalDispatcher().combine(x_TD, p, layer.experts, dispatch.Load(p.routed_E))
    ref = dispatch.unpermute(layer.experts(dispatch.permute(x_TD, p), p.splits), p, 20)
    torch.testing.assert_close(done.output_TD, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(done.kept_E, p.kept_E) and int(done.dropped) == int(p.dropped)


# ----------------------------------------------------------------------------- Quantile Balancing


def test_quantile_rule_sets_the_bias_to_minus_the_mean_price_estimate():
    """bias_rule='quantile': each training forward estimates the prices at β = −bias; end_step
    sets β to the mean estimate over the step's micro-batches (quantile_ema 0), or mixes it
    with the old β (ema)."""
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.rand(T, E, generator=g), torch.rand(T, E, generator=g)
    for ema in (0.0, 0.25):
        b = Balancer(BalanceConfig(bias_rule="quantile", quantile_ema=ema), num_experts=E, top_k=K)
        with torch.no_grad():
            b.bias.fill_(-0.1)  # β = 0.1
        est = [bal.quantile_prices(s, torch.full((E,), 0.1), K) for s in (s1, s2)]
        for s in (s1, s2):
            b.count(torch.ones(E, dtype=torch.int64), b.price_estimate(s))
        b.end_step()
        mean_E = (est[0] + est[1]) / 2
        want_E = -(ema * 0.1 + (1 - ema) * mean_E) if ema else -mean_E
        torch.testing.assert_close(b.bias, want_E, rtol=0, atol=1e-7)
        assert int(b.price_count) == 0 and float(b.price_sum.abs().sum()) == 0


def test_quantile_balancing_balances_a_skewed_layer_in_a_few_steps():
    """A fixed batch whose router sends most tokens to expert 0: Quantile Balancing brings
    MaxVio from > 2 to < 0.1 within 5 steps; the sign rule (u = 1e-2) is still above 0.5
    after 20 (measured: QB 2.28 -> 0.016 by step 5; sign 1e-2 0.66 after 60 steps)."""

    def maxvios(balance: BalanceConfig, steps: int) -> list[float]:
        torch.manual_seed(0)
        layer = moelab.MoELayer(
            MoEConfig(D, E, K, 12, router=RouterConfig(init_std=0.5), balance=balance)
        )
        x = torch.randn(256, D, generator=torch.Generator().manual_seed(1)) + 0.5
        with torch.no_grad():
            layer.router.weight[0] += 10.0 / D
        out = []
        for _ in range(steps):
            with torch.no_grad():
                out.append(float(moelab.metrics.max_violation(layer(x).counts)))
            layer.end_step()
        return out

    qb = maxvios(BalanceConfig(bias_rule="quantile"), 6)
    sign = maxvios(BalanceConfig(bias_rate=1e-2), 20)
    assert qb[0] > 2.0 and min(qb[1:]) < 0.1
    assert min(sign) > 0.5


def test_quantile_needs_no_rate_and_a_second_choice():
    """bias_rate with the quantile rule is refused (it would do nothing), so are top_k == E,
    a method that ignores the bias and quantile_ema outside [0, 1)."""
    with pytest.raises(ValueError, match="balance.bias_rate.*quantile"):
        BalanceConfig(bias_rule="quantile", bias_rate=1e-3)
    with pytest.raises(ValueError, match="balance.quantile_ema"):
        BalanceConfig(bias_rule="quantile", quantile_ema=1.0)
    qb = BalanceConfig(bias_rule="quantile")
    with pytest.raises(ValueError, match="top_k < moe.num_experts"):
        moelab.MoELayer(MoEConfig(D, 4, 4, 12, balance=qb))
    with pytest.raises(ValueError, match="bias_rule='quantile'.*router.method='sinkhorn'"):
        moelab.MoELayer(MoEConfig(D, E, K, 12, router=RouterConfig(method="sinkhorn"), balance=qb))


def test_other_rules_keep_the_checkpoint_keys():
    """The price accumulators exist only under the quantile rule."""
    assert set(Balancer(BalanceConfig(bias_rate=0.1), num_experts=E, top_k=K).state_dict()) == {
        "bias",
        "step_counts",
        "progress",
        "aux_coef",
    }
    qb = Balancer(BalanceConfig(bias_rule="quantile"), num_experts=E, top_k=K)
    assert {"price_sum", "price_count"} <= set(qb.state_dict())


# ----------------------------------------------------------------------------- sqrtsoftplus


def test_sqrtsoftplus_scores_are_the_root_of_softplus_with_the_bias_allowed():
    """score='sqrtsoftplus' (DeepSeek-V4): scores = sqrt(softplus(logits)), weights the chosen
    scores renormalised, selection by scores + bias; the loss-free bias is accepted on it."""
    g = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(T, E, generator=g)
    bias_E = torch.zeros(E)
    bias_E[3] = 5.0
    r = route(logits_TE, K, score="sqrtsoftplus", bias=bias_E)
    s_TE = torch.log1p(torch.exp(logits_TE)).sqrt()
    torch.testing.assert_close(r.scores, s_TE)
    assert (r.experts == 3).any(-1).all()
    chosen_TK = s_TE.gather(1, r.experts)
    torch.testing.assert_close(r.weights, chosen_TK / chosen_TK.sum(-1, keepdim=True))
    cfg = MoEConfig(
        D,
        E,
        K,
        12,
        router=RouterConfig(score="sqrtsoftplus"),
        balance=BalanceConfig(bias_rate=1e-3, aux_coef=0.01),
    )
    layer = moelab.MoELayer(cfg)
    out = layer(torch.randn(2, 6, D))
    (out.output.sum() + out.aux_total).backward()
    assert torch.isfinite(layer.router.weight.grad).all()
    dist_TE = bal.score_distribution(s_TE, "sqrtsoftplus")
    torch.testing.assert_close(dist_TE.sum(-1), torch.ones(T))


# ----------------------------------------------------------------------------- ReMoE


def _relu_inputs(seed: int = 0) -> BalanceInputs:
    g = torch.Generator().manual_seed(seed)
    r = relu_route(torch.randn(T, E, generator=g).requires_grad_())
    counts_E = dispatch.routed_counts(r.experts, r.mask, E)
    return BalanceInputs(r, counts_E, counts_E, True)


def test_relu_l1_term_uses_its_live_lambda_and_adapts_it_toward_k():
    """losses['l1'] = λ·relu_l1_loss with λ the live ``l1_coef``; after a step where tokens
    used more than k experts λ grows by (1 + l1_rate), after one with fewer it shrinks."""
    cfg = BalanceConfig(l1_coef=0.5, l1_rate=0.2)
    b = Balancer(cfg, num_experts=E, top_k=K)
    x = _relu_inputs()
    want = 0.5 * bal.relu_l1_loss(x.routing.weights, counts=x.counts_E, top_k=K)
    torch.testing.assert_close(b.losses(x)["l1"], want, rtol=0, atol=0)
    assert float(x.counts_E.sum()) / T > K  # about E/2 experts a token at random logits
    b.count(x.batch_E, tokens=T)
    b.end_step()
    assert float(b.l1_coef) == pytest.approx(0.6) and b.stats()["l1_coef"] == pytest.approx(0.6)
    b.count(torch.zeros(E, dtype=torch.int64), tokens=T)  # no token got an expert
    b.end_step()
    assert float(b.l1_coef) == pytest.approx(0.5) and int(b.step_tokens) == 0


def test_relu_l1_state_exists_only_when_on_and_needs_the_relu_router():
    """Other configs keep their checkpoint keys; l1_coef on another router is refused, and the
    HF attach refuses it (it needs moelab's gates)."""
    assert "l1_coef" not in Balancer(BalanceConfig(), num_experts=E, top_k=K).state_dict()
    on = Balancer(BalanceConfig(l1_coef=1e-3), num_experts=E, top_k=K).state_dict()
    assert {"l1_coef", "step_tokens"} <= set(on)
    with pytest.raises(ValueError, match="balance.l1_coef > 0 .*router.method='relu'"):
        MoEConfig(d_model=D, num_experts=E, top_k=K, d_expert=8, balance=BalanceConfig(l1_coef=1))
    from moelab.hf.attach import UNSUPPORTED

    assert "l1_coef" in UNSUPPORTED


def test_top_p_needs_softmax_scores():
    """router.method='top_p' with sigmoid scores is a one-line error naming both fields."""
    with pytest.raises(ValueError, match="router.method='top_p' needs router.score='softmax'"):
        RouterConfig(method="top_p", score="sigmoid")
    with pytest.raises(ValueError, match="router.top_p"):
        RouterConfig(method="top_p", top_p=1.5)


def test_the_layer_hands_its_router_weight_to_simbal():
    """MoELayer's simbal loss is coef · ‖W·Wᵀ − I‖₁ of its own router weight (E, D), and its
    gradient reaches that weight."""
    cfg = MoEConfig(
        d_model=D, num_experts=E, top_k=K, d_expert=8, balance=BalanceConfig(simbal_coef=0.5)
    )
    layer = moelab.MoELayer(cfg)
    out = layer(torch.randn(T, D, generator=torch.Generator().manual_seed(0)))
    want = 0.5 * bal.simbal_loss(layer.router.weight)
    torch.testing.assert_close(out.losses["simbal"], want, rtol=0, atol=0)
    out.losses["simbal"].backward()
    assert layer.router.weight.grad is not None


def test_expert_threshold_routing_is_expert_choice_on_the_batch_it_learned_from_and_causal():
    """router.method="threshold" (arXiv 2603.11535): the first step routes by top-k (no
    threshold yet); after one step with threshold_ema 0, τ_i is the ⌈T·k/E⌉-th largest score of
    expert i, so routing that batch again chooses exactly what expert choice chooses. Unlike
    expert choice it is causal: changing one token leaves every other token's experts alone.
    On a skewed router the moving thresholds bring every expert near its fair share."""
    from moelab import routing as rt
    from moelab.moe import MoELayer

    torch.manual_seed(0)
    T, D, E, K = 96, 16, 8, 2
    cfg = MoEConfig(d_model=D, num_experts=E, top_k=K, d_expert=8,
                    router=RouterConfig(method="threshold", threshold_ema=0.0))  # fmt: skip
    layer = MoELayer(cfg).train()
    with torch.no_grad():
        layer.router.weight.mul_(20).add_(torch.randn(E, 1) * 2)  # skewed scores
    x = torch.randn(T, D)
    first = layer(x)
    assert first.slot_mask.sum(1).eq(K).all()  # top-k before any threshold
    logits = x @ layer.router.weight.T
    scores = logits.softmax(-1)
    want = bal.expert_thresholds(scores, K)
    ref = torch.stack([scores[:, i].sort(descending=True).values[math.ceil(T * K / E) - 1]
                       for i in range(E)])  # fmt: skip
    torch.testing.assert_close(want, ref)
    layer.end_step()
    torch.testing.assert_close(-layer.bias, ref)
    again = layer(x)
    ec = rt.expert_choice_route(logits, K)
    assert torch.equal(again.slot_mask, ec.mask)
    y = x.clone()
    y[-1] = torch.randn(D)  # another last token
    moved = layer.eval()(y)
    assert torch.equal(moved.slot_mask[:-1], layer(x).slot_mask[:-1])
    layer.train()
    skewed = MoELayer(dataclasses.replace(cfg, router=RouterConfig(method="threshold"))).train()
    with torch.no_grad():
        skewed.router.weight.copy_(layer.router.weight)
    mv = []
    for _ in range(40):
        out = skewed(torch.randn(T, D))
        skewed.end_step()
        mv.append(float(metrics.max_violation(out.counts)))
    topk = float(metrics.max_violation(first.counts))  # the same router by top-k
    assert sum(mv[-10:]) / 10 < 0.5 * topk


def test_null_bias_controller_steers_real_experts_per_token_to_the_target():
    """balance.null_target (LongCat-Flash): the null experts' shared bias rises while tokens
    use more real experts than the target and falls below it, so the real experts a token
    settle at the target; the real experts' loss-free bias is untouched by it."""
    torch.manual_seed(0)
    T, D, E, Z, K = 256, 16, 8, 4, 2
    cfg = MoEConfig(d_model=D, num_experts=E, top_k=K, d_expert=8, null_experts=Z,
                    balance=BalanceConfig(null_target=1.0, null_rate=0.01))  # fmt: skip
    layer = moelab.MoELayer(cfg).train()
    with torch.no_grad():  # scores with a spread that a bias step does not swamp
        layer.router.weight.mul_(100)
    x = torch.randn(T, D)
    per_token = []
    for _ in range(80):
        per_token.append(float(layer(x).stats["experts_per_token"]))
        layer.end_step()
    assert per_token[0] >= 1.4 and abs(sum(per_token[-10:]) / 10 - 1.0) < 0.1
    assert float(layer.balancer.null_bias) > 0 and (layer.bias == 0).all()
    assert layer.balancer.stats()["null_bias"] == float(layer.balancer.null_bias)
    with pytest.raises(ValueError, match="needs moe.null_experts > 0"):
        MoEConfig(d_model=D, num_experts=E, top_k=K, d_expert=8,
                  balance=BalanceConfig(null_target=1.0))  # fmt: skip
