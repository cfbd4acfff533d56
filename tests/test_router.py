"""Specification tests for moelab.router: the Router module's fp32 gate, training-only noise,
masking, soft warm-up and every routing method (CPU, fixed seeds)."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.config import RouterConfig
from moelab.router import Router
from moelab.routing import route

T, D, E, K = 64, 16, 8, 2


def _router(train: bool = True, **cfg) -> Router:
    torch.manual_seed(0)
    router = Router(RouterConfig(**cfg), D, E, K)
    return router.train(train)


def _x(t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def test_router_params_fp32_and_init():
    """weight (E, D) fp32 ~ N(0, init_std); zeros with init_std=0; stays fp32 under .to(bf16)."""
    r = _router(init_std=0.1)
    assert r.weight.shape == (E, D) and r.weight.dtype == torch.float32
    assert 0.05 < r.weight.std().item() < 0.15
    assert (_router(init_std=0.0).weight == 0).all()
    assert r.to(torch.bfloat16).weight.dtype == torch.float32


def test_gate_is_fp32_under_bf16_and_autocast():
    """bf16 input under CPU autocast still gives fp32 logits equal to the fp32 computation."""
    router = _router()
    x = _x().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = router(x)
    assert r.logits.dtype == r.scores.dtype == r.weights.dtype == torch.float32
    torch.testing.assert_close(r.logits, x.float() @ router.weight.T)


def test_router_default_equals_route():
    """Default config: Router = route() on x·Wᵀ, same in train and eval; (B, L, D) is flattened."""
    router = _router()
    x = _x()
    expected = route(x @ router.weight.T, K)
    for mode in (True, False):
        r = router.train(mode)(x.view(4, T // 4, D))
        assert torch.equal(r.experts, expected.experts)


def test_learned_noise_train_only_and_zero_init():
    """Learned noise: noise_weight (E, D) zero-init; noisy logits + clean_logits/noise_std in
    train; eval gives the clean deterministic routing without them."""
    router = _router(noise="learned", noise_std=1.0)
    assert router.noise_weight.shape == (E, D) and (router.noise_weight == 0).all()
    x = _x()
    clean = x @ router.weight.T
    r = router(x)
    assert r.clean_logits is not None and r.noise_std is not None
    torch.testing.assert_close(r.clean_logits, clean)
    torch.testing.assert_close(r.noise_std, torch.full((T, E), math.log(2.0)))  # softplus(0)
    assert not torch.allclose(r.logits, clean)
    torch.testing.assert_close(r.scores, r.logits.softmax(-1))  # score fn on noisy H
    e = router.eval()(x)
    assert e.clean_logits is None and torch.equal(e.logits, clean)


@pytest.mark.parametrize("noise", ["jitter", "learned", "gumbel"])
def test_noise_anneals_to_zero(noise):
    """After noise_anneal_steps the training routing equals the noiseless one."""
    router = _router(noise=noise, noise_std=0.5, noise_anneal_steps=100)
    x = _x()
    expected = route(x @ router.weight.T, K)
    torch.manual_seed(3)
    noisy = router(x, step=0)
    late = router(x, step=100)
    assert not torch.equal(noisy.experts, expected.experts)
    assert torch.equal(late.experts, expected.experts)
    torch.testing.assert_close(late.weights, expected.weights)


def test_gumbel_samples_and_straight_through():
    """Gumbel-top-k samples experts in train; straight-through gives forward weights 1/K and a
    non-zero gradient to the router weight."""
    router = _router(noise="gumbel", straight_through=True, gumbel_tau=0.5)
    torch.manual_seed(0)
    r = router(_x())
    torch.testing.assert_close(r.weights, torch.full((T, K), 1.0 / K))
    (r.weights * torch.randn_like(r.weights)).sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_expert_masking_never_selects_masked_experts():
    """With expert_mask_prob the experts masked this forward are never selected; >= k remain."""
    router = _router(expert_mask_prob=0.6)
    x = _x()
    for seed in range(20):
        torch.manual_seed(seed)
        r = router(x)
        used = set(r.experts.unique().tolist())
        torch.manual_seed(seed)  # same draw as inside the forward
        u_E = torch.rand(E)
        keep = set((u_E >= 0.6).nonzero().flatten().tolist()) | set(u_E.topk(K).indices.tolist())
        assert used <= keep and len(keep) >= K
    assert torch.equal(router.eval()(x).experts, route(x @ router.weight.T, K).experts)


def test_soft_warmup_dense_then_hard():
    """Soft warm-up: K' = E slots, weights sum to 1 and mix scores with hard top-k by
    a = 1 - step/warmup; after warm-up (and in eval) plain hard top-k."""
    router = _router(soft_warmup_steps=10)
    x = _x()
    hard = route(x @ router.weight.T, K)
    r0 = router(x, step=0)
    assert r0.experts.shape == r0.weights.shape == (T, E)
    torch.testing.assert_close(r0.weights.sum(-1), torch.ones(T))
    dense_TE = torch.zeros(T, E).scatter(1, r0.experts, r0.weights)
    torch.testing.assert_close(dense_TE, hard.scores)  # a = 1: weights = scores
    r5 = router(x, step=5)
    hard_TE = torch.zeros(T, E).scatter(1, hard.experts, hard.weights)
    mixed_TE = torch.zeros(T, E).scatter(1, r5.experts, r5.weights)
    torch.testing.assert_close(mixed_TE, 0.5 * hard.scores + 0.5 * hard_TE)
    assert torch.equal(r5.experts[:, :K].sort(-1).values, hard.experts.sort(-1).values)
    for r in (router(x, step=10), router.eval()(x, step=0)):
        assert torch.equal(r.experts, hard.experts)


def test_expert_choice_each_expert_takes_capacity_tokens():
    """Expert choice: every expert gets exactly C = ceil(T·k/E) tokens, its highest-scoring ones."""
    router = _router(method="expert_choice", init_std=1.0)
    t = 30
    r = router(_x(t))
    C = math.ceil(t * K / E)
    assert r.experts.shape == r.mask.shape == (t, E)
    assert (r.mask.sum(0) == C).all()
    assert torch.equal(r.weights, r.scores * r.mask)
    top_CE = r.scores.topk(C, dim=0).indices
    assert torch.equal(r.mask, torch.zeros(t, E, dtype=torch.bool).scatter(0, top_CE, True))


def test_hash_is_deterministic_and_needs_token_ids():
    """Hash routing: same token id -> same k distinct experts, weights 1/k; no ids -> ValueError."""
    router = _router(method="hash")
    ids = torch.randint(0, 50, (T,), generator=torch.Generator().manual_seed(0))
    a, b = router(_x(seed=1), token_ids=ids), router(_x(seed=2), token_ids=ids)
    assert torch.equal(a.experts, b.experts)
    assert all(len(set(row)) == K for row in a.experts.tolist())
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    assert torch.equal(a.experts[same.float().argmax(0)], a.experts)  # first occurrence agrees
    torch.testing.assert_close(a.weights, torch.full((T, K), 1.0 / K))
    assert a.scores.shape == (T, E)
    with pytest.raises(ValueError, match="token_ids"):
        router(_x())


def test_uniform_is_exactly_balanced_and_random_is_distinct():
    """Uniform: token t gets (t·k + j) mod E, so counts are exactly T·k/E; random: k distinct."""
    r = _router(method="uniform").eval()(_x())
    assert torch.equal(r.experts[:, 0], (torch.arange(T) * K) % E)
    assert (torch.bincount(r.experts.flatten(), minlength=E) == T * K // E).all()
    rnd = _router(method="random").eval()(_x())
    assert all(len(set(row)) == K for row in rnd.experts.tolist())
    torch.testing.assert_close(rnd.weights, torch.full((T, K), 1.0 / K))


def test_bf16_router_computes_in_bfloat16_and_returns_fp32():
    """router.dtype='bf16': logits are F.linear in bfloat16 and scores / gate weights carry
    bf16 precision, handed on as fp32 tensors; the default stays an fp32 computation."""
    import torch.nn.functional as F

    from moelab.config import RouterConfig
    from moelab.router import Router

    torch.manual_seed(0)
    x = torch.randn(64, 32)
    fp32 = Router(RouterConfig(init_std=0.5), 32, 8, 2)
    bf16 = Router(RouterConfig(init_std=0.5, dtype="bf16"), 32, 8, 2)
    bf16.load_state_dict(fp32.state_dict())
    r32, r16 = fp32(x), bf16(x)
    want_logits = F.linear(x.bfloat16(), fp32.weight.bfloat16())
    assert r16.logits.dtype == r16.scores.dtype == r16.weights.dtype == torch.float32
    assert torch.equal(r16.logits, want_logits.float())
    want_scores = want_logits.float().softmax(-1)
    assert torch.equal(r16.scores, want_scores.bfloat16().float())
    assert torch.equal(r16.weights, r16.weights.bfloat16().float())
    assert torch.equal(r32.logits, F.linear(x, fp32.weight))
    assert not torch.equal(r16.scores, r32.scores)


# ------------------------------------------------------------------------- transformers' routers


def test_gate_bias_with_topk_before_softmax_is_the_gpt_oss_router():
    """router.gate_bias + topk_before_softmax on the same weights and inputs gives
    transformers' GptOssTopKRouter: logits x·Wᵀ + b, top-k of them, softmax over the k."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    hf_cfg = transformers.GptOssConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=K)
    theirs = GptOssTopKRouter(hf_cfg)
    ours = _router(train=False, gate_bias=True, topk_before_softmax=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(E, D, generator=g))
        theirs.bias.copy_(torch.randn(E, generator=g))
        ours.weight.copy_(theirs.weight)
        ours.gate_bias.copy_(theirs.bias)
    x = _x()
    logits, scores, indices = theirs(x)
    r = ours(x)
    torch.testing.assert_close(r.logits, logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(r.experts, indices)
    torch.testing.assert_close(r.weights, scores, rtol=1e-6, atol=1e-6)
    r.weights.sum().backward()  # the gate bias learns
    assert ours.gate_bias.grad is not None


def test_logit_softcap_with_sigmoid_is_the_laguna_router():
    """router.logit_softcap = c with sigmoid scores and a selection-only bias gives
    transformers' LagunaTopKRouter on the same weights and inputs: logits c·tanh(x·Wᵀ/c),
    top-k of sigmoid + e_score_correction_bias, weights the renormalised sigmoid scores."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.laguna.modeling_laguna import LagunaTopKRouter

    hf_cfg = transformers.LagunaConfig(
        hidden_size=D, num_experts=E, num_experts_per_tok=K, moe_router_logit_softcapping=1.5
    )
    theirs = LagunaTopKRouter(hf_cfg)
    ours = _router(train=False, score="sigmoid", logit_softcap=1.5)
    g = torch.Generator().manual_seed(4)
    bias_E = torch.randn(E, generator=g) * 0.1
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(E, D, generator=g) * 0.5)
        theirs.e_score_correction_bias.copy_(bias_E)
        ours.weight.copy_(theirs.weight)
    x = _x()
    logits, weights, experts = theirs(x)
    r = ours(x, bias=bias_E)
    assert float((x @ theirs.weight.T).abs().max()) > 3  # the cap bites
    torch.testing.assert_close(r.logits, logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(r.experts, experts)
    torch.testing.assert_close(r.weights, weights, rtol=1e-6, atol=1e-6)


def test_router_options_are_off_by_default_and_validated():
    """No gate bias parameter and no cap by default; a negative cap is a one-line error."""
    assert not hasattr(_router(), "gate_bias")
    assert RouterConfig().logit_softcap == 0.0
    with pytest.raises(ValueError, match="router.logit_softcap"):
        RouterConfig(logit_softcap=-1.0)


def test_rms_input_norm_and_expert_scale_are_the_gemma4_router():
    """router.input_norm="rms" + expert_scale on the same weights and inputs gives transformers'
    Gemma4TextRouter: RMS-normalised input × learned scale × D^-½, softmax, top-k renormalised,
    × the learned per-expert scale of each chosen expert."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    hf_cfg = transformers.Gemma4TextConfig(
        hidden_size=D, num_experts=E, top_k_experts=K, enable_moe_block=True,
        moe_intermediate_size=8,
    )  # fmt: skip
    theirs = Gemma4TextRouter(hf_cfg)
    ours = _router(train=False, input_norm="rms", expert_scale=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        theirs.proj.weight.copy_(torch.randn(E, D, generator=g))
        theirs.scale.copy_(1 + 0.3 * torch.randn(D, generator=g))
        theirs.per_expert_scale.copy_(1 + 0.3 * torch.randn(E, generator=g))
        ours.weight.copy_(theirs.proj.weight)
        ours.input_scale.copy_(theirs.scale)
        ours.expert_scale.copy_(theirs.per_expert_scale)
    x = _x() * 7.0  # the norm removes the input's scale
    probs, weights, experts = theirs(x)
    r = ours(x)
    torch.testing.assert_close(r.scores, probs, rtol=1e-6, atol=1e-6)
    assert torch.equal(r.experts, experts)
    torch.testing.assert_close(r.weights, weights, rtol=1e-6, atol=1e-6)
    r.weights.sum().backward()  # both scales learn
    assert ours.input_scale.grad.abs().sum() > 0 and ours.expert_scale.grad.abs().sum() > 0


def test_hash_gate_scores_is_the_deepseek_v4_hash_router():
    """router.method="hash" with hash_gate="scores" gives transformers' DeepseekV4HashRouter
    (routed_scaling_factor 1) whose frozen tid2eid table is moelab's hash of every token id:
    the same experts, gate weights the renormalised sqrtsoftplus scores of those experts."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HashRouter

    from moelab.routing import hash_experts

    V = 50
    hf_cfg = transformers.DeepseekV4Config(
        hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, vocab_size=V,
        scoring_func="sqrtsoftplus", routed_scaling_factor=1.0,
    )  # fmt: skip
    theirs = DeepseekV4HashRouter(hf_cfg)
    ours = _router(train=True, method="hash", hash_gate="scores", score="sqrtsoftplus")
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(E, D, generator=g))
        theirs.tid2eid.copy_(hash_experts(torch.arange(V), K, E))
        ours.weight.copy_(theirs.weight)
    x, ids = _x(), torch.randint(0, V, (T,), generator=g)
    _, weights, experts = theirs(x, ids)
    r = ours(x, token_ids=ids)
    assert torch.equal(r.experts, experts)
    torch.testing.assert_close(r.weights, weights, rtol=1e-6, atol=1e-6)
    r.weights.pow(2).sum().backward()  # the gate learns although the selection is fixed
    assert ours.weight.grad.abs().sum() > 0
    uniform = _router(train=True, method="hash", score="sqrtsoftplus")(x, token_ids=ids)
    assert torch.equal(uniform.experts, experts) and (uniform.weights == 1 / K).all()


def test_sparsemixer_is_transformers_phimoe_sparsemixer():
    """router.method="sparsemixer" (k = 2) on the same logits gives transformers' PhiMoE
    ``sparsemixer``: at inference the same experts and weights; in training, from the same
    seed, the same sampled experts, the same first-round weight and the same third-order
    gradient of it to the logits (the second round's midpoint draw is not compared:
    transformers draws that random number twice)."""
    pytest.importorskip("transformers")
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    from moelab.routing import sparsemixer_route

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(T, E, generator=g) * 0.05  # close logits: several experts compete
    w_ref, e_ref = sparsemixer(logits, jitter_eps=0.01, training=False)
    r = sparsemixer_route(logits, 2, eps=0.01, training=False)
    assert torch.equal(r.experts, e_ref)
    torch.testing.assert_close(r.weights, w_ref)
    ours_in, theirs_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    torch.manual_seed(9)
    w_ref, e_ref = sparsemixer(theirs_in, jitter_eps=0.01, training=True)
    torch.manual_seed(9)
    r = sparsemixer_route(ours_in, 2, eps=0.01, training=True)
    assert torch.equal(r.experts, e_ref)
    torch.testing.assert_close(r.weights[:, 0], w_ref[:, 0])
    w_ref[:, 0].pow(2).sum().backward()
    r.weights[:, 0].pow(2).sum().backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad)
    wide = logits.clone().requires_grad_()  # eps 1: every expert within 2x of the best competes
    sparsemixer_route(wide, 2, eps=1.0, training=True).weights[:, 0].sum().backward()
    assert (wide.grad != 0).sum() > 3 * T  # a gradient beyond the k = 2 chosen paths
    layer = _router(method="sparsemixer")
    assert layer(_x()).experts.shape == (T, K)
