"""MoELayer as a whole: shapes, every balance term, drops, padding, balance state, precision,
every routing method, capacity, shared experts, dropout, and the aux loss against transformers."""

from __future__ import annotations

import pytest
import torch

import moelab
from moelab import balance as bal
from moelab import routing as rt
from moelab.config import BalanceConfig, CapacityConfig, MoEConfig, RouterConfig

D, E, K, F = 16, 8, 2, 12


def make(
    *,
    router: RouterConfig | None = None,
    balance: BalanceConfig | None = None,
    capacity: CapacityConfig | None = None,
    seed: int = 0,
    **kw,
) -> moelab.MoELayer:
    """A small layer with a sharp (std 0.5) router so routing is not near-uniform."""
    torch.manual_seed(seed)
    cfg = MoEConfig(
        d_model=D,
        num_experts=kw.pop("num_experts", E),
        top_k=kw.pop("top_k", K),
        d_expert=F,
        router=router or RouterConfig(init_std=0.5),
        balance=balance or BalanceConfig(),
        capacity=capacity or CapacityConfig(),
        **kw,
    )
    return moelab.MoELayer(cfg)


def skew_router(layer: moelab.MoELayer, expert: int = 0, strength: float = 10.0) -> None:
    """Make every token prefer ``expert`` (with inputs of positive mean)."""
    with torch.no_grad():
        layer.router.weight[expert] += strength / D


def tokens(*shape: int, seed: int = 1, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, D, generator=g) + shift


# ----------------------------------------------------------------------------- public API


def test_public_names_give_a_dropless_softmax_topk_swiglu_layer():
    """moelab.MoEConfig with only the four sizes is dropless softmax top-k SwiGLU, no balancing."""
    cfg = moelab.MoEConfig(d_model=D, num_experts=E, top_k=K, d_expert=F)
    assert cfg.capacity.factor == 0 and cfg.router.method == "topk"
    assert cfg.router.score == "softmax" and cfg.num_shared == 0
    out = moelab.MoELayer(cfg)(tokens(10))
    assert isinstance(out, moelab.MoEOutput)
    assert int(out.dropped) == 0 and out.losses == {}
    assert {"RouterConfig", "BalanceConfig", "CapacityConfig"} <= set(moelab.__all__)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_output_has_the_input_shape(shape):
    """2-D (T, D) and 3-D (B, L, D) inputs (and more leading dims) give .output of x's shape."""
    layer = make()
    x = tokens(*shape)
    out = layer(x)
    assert out.output.shape == x.shape
    assert out.counts.shape == (E,) and int(out.counts.sum()) == x[..., 0].numel() * K


def test_matches_a_naive_per_token_reference():
    """Output = Σ_k gate_k · SwiGLU_{expert_k}(x) computed token by token."""
    layer = make()
    x = tokens(6)
    out = layer(x).output
    r = layer.router(x)
    w13, w2 = layer.experts.w13_ED2F, layer.experts.w2_EFD
    for t in range(6):
        ref = sum(
            r.weights[t, j] * moelab.experts.swiglu(x[t : t + 1], w13[e], w2[e])[0]
            for j, e in enumerate(r.experts[t].tolist())
        )
        torch.testing.assert_close(out[t], ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- balance terms

ALL_TERMS = dict(
    aux_coef=0.01,
    seq_aux_coef=0.001,
    device_coef=0.02,
    comm_coef=0.03,
    num_devices=2,
    importance_coef=0.04,
    load_coef=0.05,
    z_coef=0.001,
    entropy_coef=0.06,
    batch_entropy_coef=0.07,
    overflow_coef=0.08,
)
KEYS = {
    "aux",
    "seq_aux",
    "device",
    "comm",
    "importance",
    "load",
    "z",
    "entropy",
    "batch_entropy",
    "overflow",
}


def test_every_balance_term_composes():
    """All coefficients on at once: each key present, finite, differentiable; aux_total = sum."""
    layer = make(
        router=RouterConfig(init_std=0.5, noise="learned"),
        balance=BalanceConfig(**ALL_TERMS),
        capacity=CapacityConfig(factor=1.0),
    )
    out = layer(tokens(2, 12))
    assert set(out.losses) == KEYS
    for name, v in out.losses.items():
        assert v.dim() == 0 and torch.isfinite(v), name
    torch.testing.assert_close(out.aux_total, sum(out.losses.values()))
    (out.output.sum() + out.aux_total).backward()
    assert torch.isfinite(layer.router.weight.grad).all()
    assert layer.router.weight.grad.abs().sum() > 0


def test_losses_are_multiplied_by_their_coefficient():
    """losses['z'] = z_coef · z_loss(logits) and losses['aux'] = aux_coef · switch_loss."""
    layer = make(balance=BalanceConfig(aux_coef=0.3, z_coef=0.2))
    x = tokens(20)
    out = layer(x)
    r = layer.router(x)
    torch.testing.assert_close(out.losses["z"], 0.2 * bal.z_loss(r.logits))
    torch.testing.assert_close(out.losses["aux"], 0.3 * bal.switch_loss(r.scores, r.experts, E))


def test_aux_loss_uses_the_routing_before_capacity_drops():
    """With a tiny capacity (many drops) the aux loss equals the dropless layer's on the same
    routing (Megatron-LM #1513: computing it after drops understated it by ~30%)."""
    bcfg = BalanceConfig(aux_coef=1.0)
    dropless = make(balance=bcfg)
    tiny = make(balance=bcfg, capacity=CapacityConfig(factor=0.1))
    tiny.load_state_dict(dropless.state_dict())
    x = tokens(40)
    a, b = dropless(x), tiny(x)
    assert int(b.dropped) > 0 and int(a.dropped) == 0
    torch.testing.assert_close(a.counts, b.counts)
    torch.testing.assert_close(a.losses["aux"], b.losses["aux"])


# ----------------------------------------------------------------------------- padding mask


def test_padding_is_excluded_from_counts_losses_and_compute():
    """Masked tokens: zero MoE output (shared experts included), not counted; real tokens'
    outputs, counts and losses equal those of the layer run on the real tokens alone."""
    bcfg = BalanceConfig(
        aux_coef=1.0, z_coef=1.0, importance_coef=1.0, entropy_coef=1.0, batch_entropy_coef=1.0
    )
    layer = make(balance=bcfg, num_shared=1)
    x = tokens(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    full = layer(x, mask=mask)
    sub = layer(x[mask])
    assert (full.output[~mask] == 0).all()
    torch.testing.assert_close(full.output[mask], sub.output)
    torch.testing.assert_close(full.counts, sub.counts)
    assert int(full.counts.sum()) == int(mask.sum()) * K
    assert full.losses.keys() == sub.losses.keys()
    for name in full.losses:
        torch.testing.assert_close(full.losses[name], sub.losses[name], msg=name)


def test_padding_gets_no_gradient_from_the_moe():
    """The gradient of the output with respect to a masked token's input is zero."""
    layer = make()
    x = tokens(2, 4).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    layer(x, mask=mask).output.sum().backward()
    assert (x.grad[~mask] == 0).all() and (x.grad[mask] != 0).any()


# ----------------------------------------------------------------------------- loss-free bias


def test_end_step_moves_the_bias_against_the_load():
    """After a step where expert 0 is overloaded, its bias goes down and idle experts' go up."""
    layer = make(balance=BalanceConfig(bias_rate=0.1))
    skew_router(layer)
    out = layer(tokens(32, shift=1.0))
    counts = out.counts.float()
    assert counts.argmax() == 0
    layer.end_step()
    assert layer.bias[0] < 0
    assert (layer.bias[counts < counts.mean()] > 0).all()
    assert int(layer.step_counts.sum()) == 0 and int(layer.progress) == 1


def test_bias_changes_selection_but_not_gate_weights():
    """A large bias on expert 3 puts it in every token's top-k; the gate weights are the
    unbiased scores of the chosen experts, renormalised (DeepSeek-V3 eq. 16)."""
    layer = make(balance=BalanceConfig(bias_rate=0.1))
    x = tokens(20)
    before = layer(x).experts
    with torch.no_grad():
        layer.bias[3] = 10.0
    r = layer.router(x, bias=layer.bias)
    assert (r.experts == 3).any(-1).all() and not (before == 3).any(-1).all()
    plain = layer.router(x)
    torch.testing.assert_close(r.scores, plain.scores)  # scores carry no bias
    g = plain.scores.gather(1, r.experts)
    torch.testing.assert_close(r.weights, g / g.sum(-1, keepdim=True))


def test_bias_updates_only_in_training():
    """In eval mode no counts accumulate, so end_step leaves the bias unchanged."""
    layer = make(balance=BalanceConfig(bias_rate=0.1))
    skew_router(layer)
    layer.eval()
    layer(tokens(32, shift=1.0))
    assert int(layer.step_counts.sum()) == 0
    layer.end_step()
    assert (layer.bias == 0).all()
    layer.train()
    layer(tokens(32, shift=1.0))
    layer.end_step()
    assert (layer.bias != 0).any()


def test_global_scope_accumulates_micro_batches_and_resets_at_end_step():
    """aux_scope='global': step_counts sums the micro-batches' counts; the aux loss of a later
    micro-batch uses the accumulated counts; end_step resets the accumulator."""
    layer = make(balance=BalanceConfig(aux_coef=1.0, aux_scope="global"))
    x1, x2 = tokens(16, seed=1), tokens(16, seed=2)
    o1 = layer(x1)
    o2 = layer(x2)
    torch.testing.assert_close(layer.step_counts, o1.counts + o2.counts)
    r2 = layer.router(x2)
    want = bal.switch_loss_from_stats(counts=o1.counts + o2.counts, probs=r2.scores.mean(0))
    torch.testing.assert_close(o2.losses["aux"], want)
    layer.end_step()
    assert int(layer.step_counts.sum()) == 0


def test_adaptive_lambda_raises_the_aux_coefficient_while_maxvio_is_above_target():
    """adaptive_target: coef × (1 + rate) after an imbalanced step, down again when balanced."""
    layer = make(
        balance=BalanceConfig(aux_coef=0.01, adaptive_target=0.1, adaptive_rate=0.5),
        router=RouterConfig(method="uniform"),
    )
    with torch.no_grad():  # imbalanced counts as if from a skewed batch
        layer.step_counts.copy_(torch.tensor([50, 1, 1, 1, 1, 1, 1, 1]))
    layer.end_step()
    assert float(layer.aux_coef) == pytest.approx(0.015)
    layer(tokens(16))  # uniform routing: MaxVio = 0
    layer.end_step()
    assert float(layer.aux_coef) == pytest.approx(0.01)
    assert "aux" in layer(tokens(16)).losses


# ----------------------------------------------------------------------------- precision


def test_router_stays_fp32_under_bf16_autocast():
    """Under bf16 autocast the router logits and scores are fp32; the layer runs and trains."""
    layer = make()
    x = tokens(3, 5).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(x)
        out = layer(x)
    assert r.logits.dtype == torch.float32 and r.weights.dtype == torch.float32
    assert out.output.shape == x.shape and torch.isfinite(out.output).all()
    out.output.float().sum().backward()
    assert layer.router.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()


def test_layer_works_in_bf16_with_an_fp32_router():
    """layer.to(bf16): expert weights bf16, router fp32; bf16 input gives bf16 output and grads."""
    layer = make().to(torch.bfloat16)
    assert layer.router.weight.dtype == torch.float32
    assert layer.experts.w13_ED2F.dtype == torch.bfloat16
    x = tokens(2, 5).to(torch.bfloat16).requires_grad_()
    out = layer(x)
    assert out.output.dtype == torch.bfloat16
    out.output.float().sum().backward()
    assert layer.experts.w13_ED2F.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all()


# ----------------------------------------------------------------------------- routing methods

ROUTERS = {
    "topk": RouterConfig(),
    "expert_choice": RouterConfig(method="expert_choice"),
    "sinkhorn": RouterConfig(method="sinkhorn"),
    "hash": RouterConfig(method="hash"),
    "random": RouterConfig(method="random"),
    "uniform": RouterConfig(method="uniform"),
    "sigmoid": RouterConfig(score="sigmoid"),
    "mixtral": RouterConfig(topk_before_softmax=True),
    "jitter": RouterConfig(noise="jitter", noise_std=0.1, noise_anneal_steps=10),
    "learned": RouterConfig(noise="learned"),
    "gumbel_st": RouterConfig(noise="gumbel", straight_through=True, gumbel_tau=0.5),
    "soft_warmup": RouterConfig(soft_warmup_steps=5),
    "expert_mask": RouterConfig(expert_mask_prob=0.5),
    "groups": RouterConfig(num_groups=4, topk_groups=2),
}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_every_router_method_and_option_runs_forward_and_backward(name):
    """Each RouterConfig method/option through MoELayer: finite output, gradients reach the
    experts (and the router, where the method is differentiable), with a balance loss on."""
    layer = make(router=ROUTERS[name], balance=BalanceConfig(aux_coef=0.01, z_coef=0.001))
    x = tokens(2, 8).requires_grad_()
    ids = torch.arange(16).view(2, 8)
    out = layer(x, token_ids=ids)
    assert out.output.shape == x.shape and torch.isfinite(out.output).all()
    (out.output.square().sum() + out.aux_total).backward()
    assert layer.experts.w13_ED2F.grad.abs().sum() > 0
    assert torch.isfinite(layer.router.weight.grad).all()
    assert layer.router.weight.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


def test_hash_routing_needs_token_ids():
    """router.method='hash' without token_ids raises a ValueError naming token_ids."""
    with pytest.raises(ValueError, match="token_ids"):
        make(router=RouterConfig(method="hash"))(tokens(4))


def test_soft_warmup_uses_every_expert_then_anneals_to_top_k():
    """During soft warm-up every expert gets every token; after it, k per token."""
    layer = make(router=RouterConfig(init_std=0.5, soft_warmup_steps=2))
    assert int(layer(tokens(4)).counts.sum()) == 4 * E
    layer.end_step()
    layer.end_step()
    assert int(layer(tokens(4)).counts.sum()) == 4 * K


# ----------------------------------------------------------------------------- capacity


def test_capacity_drops_are_counted():
    """With CF = 0.5 slots are dropped: dropped = routed − kept, kept <= C per expert."""
    layer = make(capacity=CapacityConfig(factor=0.5))
    skew_router(layer)
    out = layer(tokens(32, shift=1.0))
    C = moelab.dispatch.capacity(32, K, E, 0.5)
    assert int(out.dropped) > 0
    assert int(out.dropped) == int(out.counts.sum() - out.kept.sum())
    assert int(out.kept.max()) <= C


def test_eval_capacity_factor_differs_from_training():
    """eval_factor=0 (dropless at inference) while training drops at factor 0.5."""
    layer = make(capacity=CapacityConfig(factor=0.5, eval_factor=0.0))
    skew_router(layer)
    x = tokens(32, shift=1.0)
    assert int(layer(x).dropped) > 0
    layer.eval()
    assert int(layer(x).dropped) == 0


def test_dropped_slots_pass_only_through_the_residual():
    """A token whose every slot is dropped gets a zero MoE output."""
    layer = make(capacity=CapacityConfig(factor=0.25, policy="position"))
    skew_router(layer, strength=20.0)
    out = layer(tokens(32, shift=1.0))
    assert int(out.dropped) > 0
    assert (out.output == 0).all(-1).any()


def test_reroute_lowers_drops():
    """reroute=True (No-Token-Left-Behind) drops fewer slots than the same layer without it."""
    plain = make(capacity=CapacityConfig(factor=1.0))
    skew_router(plain)
    rerouted = make(capacity=CapacityConfig(factor=1.0, reroute=True))
    rerouted.load_state_dict(plain.state_dict())
    x = tokens(32, shift=1.0)
    a, b = plain(x), rerouted(x)
    assert int(a.dropped) > 0
    assert int(b.dropped) < int(a.dropped)
    torch.testing.assert_close(a.counts, b.counts)  # counts stay what the router asked for


# ----------------------------------------------------------------------------- experts


def test_shared_experts_add_an_always_on_path():
    """Output = routed experts' output + shared(x) for every token."""
    layer = make(num_shared=2, d_shared=6)
    x = tokens(10)
    out = layer(x).output
    shared, layer.shared = layer.shared, None
    routed = layer(x).output
    torch.testing.assert_close(out, routed + shared(x))


def test_expert_dropout_only_in_training():
    """expert_dropout: eval output is deterministic and equals the dropout-free layer's;
    training output differs from it."""
    layer = make(expert_dropout=0.5)
    ref = make()
    ref.load_state_dict(layer.state_dict())
    x = tokens(12)
    layer.eval()
    torch.testing.assert_close(layer(x).output, ref(x).output)
    layer.train()
    assert not torch.allclose(layer(x).output, ref(x).output)


# ----------------------------------------------------------------------------- oracle


def test_switch_loss_matches_transformers_load_balancing_loss():
    """balance.switch_loss on the layer's routing = transformers' load_balancing_loss_func / k,
    and so does the layer's aux loss with coefficient 1 (an oracle nobody here wrote)."""
    hf = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    k = 3
    layer = make(top_k=k, balance=BalanceConfig(aux_coef=1.0))
    x = tokens(40)
    out = layer(x)
    r = layer.router(x)
    theirs = hf.load_balancing_loss_func((r.logits,), num_experts=E, top_k=k)
    torch.testing.assert_close(bal.switch_loss(r.scores, r.experts, E), theirs / k)
    torch.testing.assert_close(out.losses["aux"], theirs / k)


def test_route_is_the_layers_selection():
    """The layer's experts are route()'s top-k on the router's fp32 logits."""
    layer = make()
    x = tokens(9)
    r = rt.route(torch.nn.functional.linear(x, layer.router.weight), K)
    assert torch.equal(layer(x).experts, r.experts)


def test_hash_layers_route_the_first_moe_layers_by_token_id():
    """model.moe.hash_layers = 2: the first two MoE layers choose experts by the token id alone
    (DeepSeek-V4), weights from their learned scores and no loss-free bias; the later layers
    route by top-k with the bias. The same token in two contexts goes to the same experts."""
    import dataclasses

    from moelab.model import ModelConfig, MoELM

    moe = MoEConfig(d_model=32, num_experts=8, top_k=2, d_expert=16, hash_layers=2,
                    balance=BalanceConfig(bias_rate=1e-3))  # fmt: skip
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=2, max_seq_len=16, vocab_size=40, moe=moe)
    model = MoELM(cfg).train()
    kinds = [(layer.cfg.router.method, layer.balancer.bias_on) for layer in model.moe_layers]
    assert kinds == [("hash", False), ("hash", False), ("topk", True)]
    a = torch.tensor([[5, 7, 9, 11]])
    b = torch.tensor([[3, 2, 1, 11]])  # token 11 after another context
    out_a, out_b = model(a, a).moe, model(b, b).moe
    for i in range(2):
        assert torch.equal(out_a[i].experts[-1], out_b[i].experts[-1])
    with pytest.raises(ValueError, match="moe.hash_layers"):
        dataclasses.replace(moe, hash_layers=-1)


def test_null_experts_are_longcat_flash_identity_experts():
    """moe.null_experts = Z on the same weights and inputs gives transformers' LongcatFlashMoE
    (zero_expert_num = Z, routed_scaling_factor 1): softmax over E + Z, top-k, a null slot
    returns its gate weight × the input. Counts and balance see the E real experts only, and
    experts_per_token is the real experts a token uses."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

    D, E, Z, K, F = 16, 6, 3, 2, 8
    hf_cfg = transformers.LongcatFlashConfig(
        hidden_size=D, n_routed_experts=E, zero_expert_num=Z, num_experts_per_tok=K,
        expert_ffn_hidden_size=F, routed_scaling_factor=1.0,
    )  # fmt: skip
    theirs = LongcatFlashMoE(hf_cfg).eval()
    cfg = MoEConfig(d_model=D, num_experts=E, top_k=K, d_expert=F, null_experts=Z,
                    router=RouterConfig(normalize=False),
                    balance=BalanceConfig(aux_coef=0.01, bias_rate=1e-3))  # fmt: skip
    ours = moelab.MoELayer(cfg).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        theirs.router.classifier.weight.copy_(torch.randn(E + Z, D, generator=g))
        theirs.experts.gate_up_proj.normal_(0, 0.3, generator=g)
        theirs.experts.down_proj.normal_(0, 0.3, generator=g)
        ours.router.weight.copy_(theirs.router.classifier.weight)
        ours.experts.w13_ED2F.copy_(theirs.experts.gate_up_proj[:E].transpose(1, 2))
        ours.experts.w2_EFD.copy_(theirs.experts.down_proj.transpose(1, 2))
    x = torch.randn(2, 12, D, generator=g)
    out = ours(x)
    torch.testing.assert_close(out.output, theirs(x), rtol=1e-5, atol=1e-6)
    _, _, chosen = theirs.router(x)
    real = (chosen < E).sum(-1)  # real experts per token in transformers' routing
    assert real.min() < K, "the check needs tokens that chose a null expert"
    assert int(out.counts.sum()) == int(real.sum()) and out.counts.shape == (E,)
    assert abs(float(out.stats["experts_per_token"]) - real.float().mean().item()) < 1e-6
    ours.train()
    train_out = ours(x)  # the balance terms and the bias cover the real experts
    assert set(train_out.losses) == {"aux"} and ours.bias.shape == (E,)
    with pytest.raises(ValueError, match="moe.null_experts=2 does not work with router.method"):
        MoEConfig(d_model=D, num_experts=E, top_k=K, d_expert=F, null_experts=2,
                  router=RouterConfig(method="expert_choice"))  # fmt: skip


def test_default_outputs_give_the_router_a_dense_gradient_and_leave_the_output_alone():
    """moe.default_outputs (Default MoE, Panda et al. 2025): the training output equals the
    plain layer's; ê after the first forward is each expert's mean output over its routed
    tokens; every unselected expert's score gets ⟨∂L/∂y_t, ê_i⟩, so the router gradient is the
    plain one plus the gradient of Σ_{i ∉ A_t} p_ti·⟨g_t, ê_i⟩ (checked by autograd)."""
    import dataclasses

    torch.manual_seed(0)
    T, D, E, K = 24, 16, 6, 2
    base = MoEConfig(d_model=D, num_experts=E, top_k=K, d_expert=8)
    plain = moelab.MoELayer(base).train()
    dense = moelab.MoELayer(dataclasses.replace(base, default_outputs=True, default_ema=0.5))
    dense.load_state_dict(plain.state_dict(), strict=False)
    dense.train()
    x = torch.randn(T, D)
    g = torch.randn(T, D)
    out_p, out_d = plain(x), dense(x)
    torch.testing.assert_close(out_d.output, out_p.output, rtol=0, atol=0)
    experts_TK = out_p.experts
    ref_ED = torch.stack([
        torch.stack([plain.experts.forward_loop(x[t:t + 1], experts_TK[t:t + 1, j:j + 1],
                     torch.ones(1, 1))[0] for t, j in (experts_TK == e).nonzero().tolist()]).mean(0)
        for e in range(E)
    ])  # fmt: skip
    torch.testing.assert_close(dense.default_ED, ref_ED, rtol=1e-5, atol=1e-6)
    (out_p.output * g).sum().backward()
    (out_d.output * g).sum().backward()
    w = plain.router.weight.detach().clone().requires_grad_()
    p_TE = (x @ w.T).softmax(-1)
    unsel_TE = torch.ones(T, E).scatter(1, experts_TK, 0.0)
    extra = ((p_TE * unsel_TE) * (g @ ref_ED.T)).sum()
    extra.backward()
    torch.testing.assert_close(dense.router.weight.grad, plain.router.weight.grad + w.grad,
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    assert w.grad.abs().sum() > 0
    dense(x)  # second forward: ê ← 0.5·ê + 0.5·mean (the same batch: unchanged)
    torch.testing.assert_close(dense.default_ED, ref_ED, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("grouped", ["auto", "off"])
def test_one_layer_on_cuda_equals_the_cpu_at_fp32(grouped, monkeypatch):
    """One MoE layer (loss-free bias, global aux and z-loss on; 16-byte aligned sizes) on CUDA
    in fp32 gives the CPU's routing, and its output, losses and gradients to 1e-4, with the
    experts on grouped GEMM where it runs (``auto``) and on the per-expert path (``off``)."""
    from moelab import experts as experts_mod

    monkeypatch.setattr(experts_mod, "GROUPED_MM", grouped)
    bal_cfg = BalanceConfig(aux_coef=0.01, aux_scope="global", z_coef=1e-3, bias_rate=0.01)
    results = []
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        cfg = MoEConfig(d_model=32, num_experts=E, top_k=K, d_expert=64, balance=bal_cfg)
        layer = moelab.MoELayer(cfg).to(dev)
        x = torch.randn(4, 24, 32).to(dev).requires_grad_()
        out = layer(x)
        (out.output.square().mean() + out.aux_total).backward()
        grads = [x.grad, *(p.grad for p in layer.parameters() if p.grad is not None)]
        results.append((out.experts, out.output, out.aux_total, *grads))
    cpu, cuda = results
    assert torch.equal(cpu[0], cuda[0].cpu())
    for a, b in zip(cpu[1:], cuda[1:], strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
