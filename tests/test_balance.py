"""Specification tests for moelab.balance: paper formulas on hand-worked numbers, library
oracles, padding masks, balance points and properties of the loss-free bias rules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab import balance as bl

approx = lambda x, **kw: pytest.approx(x, rel=1e-5, abs=1e-6, **kw)


def _random_routing(T: int, E: int, K: int, seed: int = 0):
    """Softmax scores (T, E) with grad and their top-K experts (T, K)."""
    g = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(T, E, generator=g)
    scores_TE = logits_TE.softmax(-1).requires_grad_()
    experts_TK = scores_TE.detach().topk(K, dim=-1).indices
    return logits_TE, scores_TE, experts_TK


# ----------------------------------------------------------------------------- Switch loss


@pytest.mark.parametrize("K", [1, 2, 3])
def test_switch_loss_matches_transformers_times_k(K):
    """transformers' Mixtral load_balancing_loss_func (one layer) equals K × our switch_loss."""
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    E = 8
    logits_TE, scores_TE, experts_TK = _random_routing(64, E, K, seed=K)
    theirs = hf.load_balancing_loss_func((logits_TE,), num_experts=E, top_k=K)
    ours = bl.switch_loss(scores_TE, experts_TK, E)
    assert ours.item() * K == approx(float(theirs))


def test_switch_loss_matches_transformers_with_attention_mask():
    """With an attention mask transformers drops padded rows from counts and means, as we do."""
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    B, L, E, K = 2, 16, 8, 2
    logits_TE, scores_TE, experts_TK = _random_routing(B * L, E, K, seed=7)
    mask_BL = torch.ones(B, L, dtype=torch.bool)
    mask_BL[0, 10:] = False
    mask_BL[1, 3:] = False
    theirs = hf.load_balancing_loss_func(
        (logits_TE,), num_experts=E, top_k=K, attention_mask=mask_BL.long()
    )
    ours = bl.switch_loss(scores_TE, experts_TK, E, mask=mask_BL.reshape(-1))
    assert ours.item() * K == approx(float(theirs))


def test_switch_loss_hand_example():
    """2 tokens, 4 experts, top-1, both on expert 0: c = [2,0,0,0], P_0 = (0.7+0.4)/2 = 0.55,
    loss = E/(K·T)·c_0·P_0 = 4/2·2·0.55 = 2.2."""
    scores_TE = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]])
    experts_TK = torch.tensor([[0], [0]])
    assert float(bl.switch_loss(scores_TE, experts_TK, 4)) == approx(2.2)


def test_switch_loss_is_one_at_balance():
    """Uniform scores and round-robin top-2 choices give exactly 1.0."""
    T, E, K = 8, 4, 2
    scores_TE = torch.full((T, E), 1 / E)
    experts_TK = torch.arange(T * K).reshape(T, K) % E
    assert float(bl.switch_loss(scores_TE, experts_TK, E)) == approx(1.0)


def test_switch_loss_gradient_is_count_over_tokens():
    """d loss / d scores_ti = E/(K·T)·c_i/T for every token t (counts are constants)."""
    T, E, K = 12, 6, 2
    _, scores_TE, experts_TK = _random_routing(T, E, K, seed=3)
    bl.switch_loss(scores_TE, experts_TK, E).backward()
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E).float()
    expected_TE = (E / (K * T) * counts_E / T).expand(T, E)
    torch.testing.assert_close(scores_TE.grad, expected_TE)


@given(scale=st.integers(1, 50), seed=st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_switch_loss_from_stats_is_scope_free(scale, seed):
    """Accumulating identical counts over `scale` micro-batches leaves the loss unchanged."""
    g = torch.Generator().manual_seed(seed)
    counts_E = torch.randint(0, 20, (6,), generator=g).float() + 1
    probs_E = torch.rand(6, generator=g).softmax(-1)
    one = bl.switch_loss_from_stats(counts=counts_E, probs=probs_E)
    many = bl.switch_loss_from_stats(counts=counts_E * scale, probs=probs_E)
    assert float(many) == approx(float(one))


def test_sequence_switch_loss_is_mean_of_per_sequence_losses():
    """DeepSeek-V3 eq. 17-20: mean over sequences of switch_loss on each (masked) sequence;
    an all-padding sequence is left out."""
    B, L, E, K = 3, 10, 5, 2
    _, scores_TE, experts_TK = _random_routing(B * L, E, K, seed=11)
    scores_BLE, experts_BLK = scores_TE.reshape(B, L, E), experts_TK.reshape(B, L, K)
    mask_BL = torch.ones(B, L, dtype=torch.bool)
    mask_BL[1, 6:] = False
    mask_BL[2] = False
    got = bl.sequence_switch_loss(scores_BLE, experts_BLK, E, mask_BL=mask_BL)
    per_seq = [bl.switch_loss(scores_BLE[b], experts_BLK[b], E, mask=mask_BL[b]) for b in range(2)]
    assert got.item() == approx(sum(p.item() for p in per_seq) / 2)


# ----------------------------------------------------------------------------- device / comm


def test_device_loss_hand_example():
    """E=4 on G=2 devices, counts [3,1,0,0], P = [.4,.3,.2,.1]: f = E·c/Σc = [3,1,0,0],
    f' = [2, 0], P' = [0.7, 0.3], loss = 2·0.7 = 1.4."""
    loss = bl.device_loss(
        counts=torch.tensor([3.0, 1, 0, 0]), probs=torch.tensor([0.4, 0.3, 0.2, 0.1]), num_devices=2
    )
    assert float(loss) == approx(1.4)


def test_device_and_comm_loss_are_one_at_balance():
    """Equal counts / equal device hits (each token on exactly M devices) give 1.0."""
    probs_E = torch.rand(8, generator=torch.Generator().manual_seed(0)).softmax(-1)
    dev = bl.device_loss(counts=torch.full((8,), 5.0), probs=probs_E, num_devices=4)
    # 6 tokens, each on M=2 of 4 devices, every device hit 3 times
    experts_TK = torch.tensor([[0, 2], [4, 6], [1, 7], [3, 5], [0, 6], [2, 4]])
    hits_G = bl.device_hits(experts_TK, 8, 4)
    assert hits_G.tolist() == [3.0, 3.0, 3.0, 3.0]
    comm = bl.comm_loss(device_hits=hits_G, probs=probs_E, num_devices=4, max_devices=2)
    assert float(dev) == approx(1.0) and float(comm) == approx(1.0)


def test_device_hits_and_comm_loss_hand_example():
    """E=4 on 2 devices, K=2: token 0 → {0,1} (device 0), token 1 → {0,2} (devices 0,1),
    token 2 → {3,2} (device 1): hits [2,2]. comm with hits [3,1], M=1, P'=[0.7,0.3]:
    f'' = G·h/Σh = [1.5, 0.5], loss = 1.5·0.7 + 0.5·0.3 = 1.2."""
    hits_G = bl.device_hits(torch.tensor([[0, 1], [0, 2], [3, 2]]), 4, 2)
    assert hits_G.tolist() == [2.0, 2.0]
    loss = bl.comm_loss(
        device_hits=torch.tensor([3.0, 1.0]),
        probs=torch.tensor([0.4, 0.3, 0.2, 0.1]),
        num_devices=2,
        max_devices=1,
    )
    assert float(loss) == approx(1.2)


def test_overflow_loss_hand_example():
    """counts [5,2,1,0], C=3, P=[.4,.3,.2,.1]: excess [2,0,0,0]/Σc=8, loss = 4·(2/8)·0.4 = 0.4;
    zero when nothing overflows or when dropless (C=0)."""
    counts_E, probs_E = torch.tensor([5.0, 2, 1, 0]), torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert float(bl.overflow_loss(counts=counts_E, probs=probs_E, capacity=3)) == approx(0.4)
    assert float(bl.overflow_loss(counts=counts_E, probs=probs_E, capacity=5)) == 0.0
    assert float(bl.overflow_loss(counts=counts_E, probs=probs_E, capacity=0)) == 0.0


# ----------------------------------------------------------------------------- Shazeer, z, entropy


def test_importance_loss_hand_example():
    """Shazeer eq. 6: gates [[.6,.4 on 0,1],[.5,.5 on 0,2]] → Importance [1.1,.4,.5,0],
    mean .5, population var (.36+.01+0+.25)/4 = .155, CV² = .155/.25 = 0.62."""
    weights_TK = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    experts_TK = torch.tensor([[0, 1], [0, 2]])
    assert float(bl.importance_loss(weights_TK, experts_TK, 4)) == approx(0.62)


def test_smooth_load_loss_hand_example():
    """Shazeer eq. 8-10, 1 token, E=3, k=1, noisy [2,1,0], clean [1.5,1,.5], std 1:
    P = [Φ(1.5−1), Φ(1−2), Φ(.5−2)] = [.691462, .158655, .066807], CV² = 0.811790."""
    loss = bl.smooth_load_loss(
        clean_logits=torch.tensor([[1.5, 1.0, 0.5]]),
        noisy_logits=torch.tensor([[2.0, 1.0, 0.0]]),
        noise_std=torch.ones(1, 3),
        k=1,
    )
    assert float(loss) == approx(0.8117903)


def _smooth_load_reference(clean, noisy, std, k):
    """Token-by-token, expert-by-expert loop over Shazeer eq. 8-10."""
    T, E = clean.shape
    load = [0.0] * E
    for t in range(T):
        for i in range(E):
            others = sorted((float(noisy[t, j]) for j in range(E) if j != i), reverse=True)
            z = (float(clean[t, i]) - others[k - 1]) / float(std[t, i])
            load[i] += 0.5 * (1 + math.erf(z / math.sqrt(2)))
    mean = sum(load) / E
    return sum((x - mean) ** 2 for x in load) / E / mean**2


@pytest.mark.parametrize("k", [1, 2, 4])
def test_smooth_load_loss_matches_loop_reference(k):
    """The vectorised estimator equals a slow loop computing kth_excluding literally."""
    g = torch.Generator().manual_seed(k)
    T, E = 9, 6
    clean_TE = torch.randn(T, E, generator=g)
    std_TE = torch.rand(T, E, generator=g) + 0.1
    noisy_TE = clean_TE + std_TE * torch.randn(T, E, generator=g)
    got = bl.smooth_load_loss(clean_logits=clean_TE, noisy_logits=noisy_TE, noise_std=std_TE, k=k)
    assert float(got) == approx(_smooth_load_reference(clean_TE, noisy_TE, std_TE, k))


def test_z_loss_hand_example():
    """ST-MoE eq. 5: rows [0,0,0,0] (lse = ln 4) and [ln 5,0,0,0] (lse = ln 8):
    ((2 ln2)² + (3 ln2)²)/2 = 6.5·(ln 2)² = 3.1229446."""
    logits_TE = torch.tensor([[0.0, 0, 0, 0], [math.log(5), 0, 0, 0]])
    assert float(bl.z_loss(logits_TE)) == approx(3.1229446)


def test_entropy_losses_hand_example():
    """p_0 uniform (H = ln 4), p_1 = [1,0,0,0] (H = 0): token loss = ln4 − ln4/2 = ln 2;
    batch mean [.625,.125,.125,.125]: loss = ln 4 − H(mean) = 0.3127515. Sigmoid scores
    [.5,.5,.5,.5] normalise to uniform: token loss 0."""
    scores_TE = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0, 0, 0]])
    assert float(bl.token_entropy_loss(scores_TE)) == approx(math.log(2))
    assert float(bl.batch_entropy_loss(scores_TE)) == approx(0.3127515)
    assert float(bl.token_entropy_loss(torch.full((3, 4), 0.5))) == approx(0.0)


# ----------------------------------------------------------------------------- padding masks


def _all_losses(scores_TE, logits_TE, experts_TK, weights_TK, E, mask):
    noisy_TE = logits_TE + 0.3 * torch.sin(logits_TE * 7)
    return {
        "switch": bl.switch_loss(scores_TE, experts_TK, E, mask=mask),
        "importance": bl.importance_loss(weights_TK, experts_TK, E, mask=mask),
        "smooth_load": bl.smooth_load_loss(
            clean_logits=logits_TE,
            noisy_logits=noisy_TE,
            noise_std=torch.full_like(logits_TE, 0.5),
            k=experts_TK.shape[1],
            mask=mask,
        ),
        "z": bl.z_loss(logits_TE, mask=mask),
        "token_entropy": bl.token_entropy_loss(scores_TE, mask=mask),
        "batch_entropy": bl.batch_entropy_loss(scores_TE, mask=mask),
        "device_hits": bl.device_hits(experts_TK, E, 2, mask=mask),
    }


def test_masked_tokens_have_no_effect():
    """Every masked loss equals the same loss on the unmasked subset of tokens."""
    T, E, K = 20, 6, 2
    logits_TE, scores_TE, experts_TK = _random_routing(T, E, K, seed=5)
    weights_TK = scores_TE.gather(1, experts_TK)
    mask_T = torch.rand(T, generator=torch.Generator().manual_seed(1)) > 0.4
    full = _all_losses(scores_TE, logits_TE, experts_TK, weights_TK, E, mask_T)
    sub = _all_losses(
        scores_TE[mask_T], logits_TE[mask_T], experts_TK[mask_T], weights_TK[mask_T], E, None
    )
    for name in full:
        torch.testing.assert_close(full[name], sub[name], msg=name)


# ----------------------------------------------------------------------------- sigmoid gaming


def test_normalised_sigmoid_loss_cannot_be_gamed_by_shrinking_scores():
    """switch_loss on score_distribution(sigmoid) is invariant to scaling all scores by 1e-6
    (Megatron-LM #1545); an `s/(Σs+eps)` normalisation lets scaling by 1e-7 shrink it ~4x."""
    T, E, K = 16, 8, 2
    g = torch.Generator().manual_seed(2)
    sig_TE = torch.randn(T, E, generator=g).sigmoid()
    experts_TK = sig_TE.topk(K, dim=-1).indices
    loss = lambda s: float(bl.switch_loss(bl.score_distribution(s, "sigmoid"), experts_TK, E))
    assert loss(sig_TE * 1e-6) == approx(loss(sig_TE))
    eps_TE = lambda s: s / (s.sum(-1, keepdim=True) + 1e-6)
    gamed = float(bl.switch_loss(eps_TE(sig_TE * 1e-7), experts_TK, E))
    assert gamed < 0.3 * loss(sig_TE)
    assert bl.score_distribution(sig_TE, "softmax") is sig_TE


# ----------------------------------------------------------------------------- bias rules


counts_strategy = st.lists(st.integers(0, 1000), min_size=2, max_size=16)


@given(
    counts=counts_strategy, rate=st.floats(1e-5, 1.0), rule=st.sampled_from(bl.BiasRule.__args__)
)
@settings(max_examples=200, deadline=None)
def test_update_bias_moves_against_the_load(counts, rate, rule):
    """Wang et al. Alg. 1: an overloaded expert's bias never increases, an underloaded
    expert's never decreases, for every rule."""
    counts_E = torch.tensor(counts, dtype=torch.float32)
    bias_E = torch.linspace(-1, 1, len(counts))
    step_E = bl.update_bias(bias_E, counts_E, rate, rule) - bias_E
    mean = counts_E.mean()
    assert (step_E[counts_E > mean] <= 0).all()
    assert (step_E[counts_E < mean] >= 0).all()


@given(counts=counts_strategy, rule=st.sampled_from(bl.BiasRule.__args__))
@settings(max_examples=100, deadline=None)
def test_update_bias_center_gives_zero_mean(counts, rule):
    """With center=True the new bias has zero mean, whatever it started from."""
    bias_E = torch.arange(len(counts), dtype=torch.float32)
    new_E = bl.update_bias(bias_E, torch.tensor(counts), 0.01, rule, center=True)
    assert abs(float(new_E.mean())) < 1e-5


def test_update_bias_values_and_validation():
    """Sign rule on counts [1,3] (mean 2): [+u, −u]; proportional: u·[1,−1]/2; result carries
    no grad; a bad rule raises a ValueError naming `rule`."""
    bias_E = torch.zeros(2, requires_grad=True)
    counts_E = torch.tensor([1, 3])
    new_E = bl.update_bias(bias_E, counts_E, 0.1)
    assert new_E.tolist() == approx([0.1, -0.1]) and not new_E.requires_grad
    assert bl.update_bias(bias_E, counts_E, 0.1, "proportional").tolist() == approx([0.05, -0.05])
    with pytest.raises(ValueError, match="rule"):
        bl.update_bias(bias_E, counts_E, 0.1, "additive")
    with pytest.raises(ValueError, match="counts"):
        bl.update_bias(bias_E, torch.ones(3), 0.1)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_bias_rate_at_endpoints(schedule):
    """Full rate at step 0; at and beyond total_steps 0 for linear/cosine, unchanged if constant;
    half way: linear and cosine both give rate/2."""
    end = 1e-3 if schedule == "constant" else 0.0
    assert bl.bias_rate_at(0, 100, 1e-3, schedule) == approx(1e-3)
    assert bl.bias_rate_at(100, 100, 1e-3, schedule) == approx(end)
    assert bl.bias_rate_at(500, 100, 1e-3, schedule) == approx(end)
    assert bl.bias_rate_at(50, 100, 1e-3, schedule) == approx(1e-3 if end else 5e-4)


def test_adapt_coef_up_down_and_clip():
    """Raised by (1+rate) above target, lowered below, clipped to [lo, hi]."""
    kw = dict(target=0.1, rate=0.5, lo=0.01, hi=1.0)
    assert bl.adapt_coef(0.1, 0.3, **kw) == approx(0.15)
    assert bl.adapt_coef(0.3, 0.05, **kw) == approx(0.2)
    assert bl.adapt_coef(0.9, 0.3, **kw) == 1.0
    assert bl.adapt_coef(0.012, 0.0, **kw) == 0.01


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call, name",
    [
        (
            lambda: bl.switch_loss(torch.rand(4, 5), torch.zeros(4, 1, dtype=torch.long), 6),
            "num_experts",
        ),
        (lambda: bl.switch_loss(torch.rand(4, 5), torch.zeros(4, 1), 5), "experts"),
        (lambda: bl.z_loss(torch.rand(4, 5), mask=torch.ones(3, dtype=torch.bool)), "mask"),
        (lambda: bl.z_loss(torch.rand(4, 5), mask=torch.ones(4)), "mask"),
        (
            lambda: bl.smooth_load_loss(
                clean_logits=torch.rand(2, 3),
                noisy_logits=torch.rand(2, 3),
                noise_std=torch.ones(2, 3),
                k=3,
            ),
            "k",
        ),
        (
            lambda: bl.device_loss(counts=torch.ones(6), probs=torch.ones(6), num_devices=4),
            "num_devices",
        ),
        (lambda: bl.score_distribution(torch.rand(2, 3), "tanh"), "score"),
        (lambda: bl.bias_rate_at(1, 10, 0.1, "step"), "schedule"),
        (
            lambda: bl.overflow_loss(counts=torch.ones(2), probs=torch.ones(2), capacity=-1),
            "capacity",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    """Obvious misuse raises ValueError whose message starts with the argument's name."""
    with pytest.raises(ValueError, match=f"^{name}="):
        call()


# ----------------------------------------------------------------------------- Quantile Balancing


def _quantile_reference(s_TE, beta_E, k, mask_T=None):
    """Su 2026 by hand: a_t = (k+1)-th largest of s_t − β; β_i = (⌈T·k/E⌉+1)-th largest over
    the real tokens of s_ti − a_t (the T-th when there are fewer)."""
    rows = [t for t in range(s_TE.shape[0]) if mask_T is None or bool(mask_T[t])]
    T, E = len(rows), s_TE.shape[1]
    cutoff = {t: sorted((s_TE[t] - beta_E).tolist(), reverse=True)[k] for t in rows}
    rank = min(math.ceil(T * k / E) + 1, T)
    out = []
    for i in range(E):
        column = sorted((float(s_TE[t, i]) - cutoff[t] for t in rows), reverse=True)
        out.append(column[rank - 1])
    return torch.tensor(out)


@pytest.mark.parametrize(
    "seed, T, E, k", [(0, 32, 8, 2), (1, 7, 4, 1), (2, 50, 6, 3), (3, 3, 8, 2)]
)
def test_quantile_prices_match_the_formula_by_hand(seed, T, E, k):
    """quantile_prices == a per-token, per-expert loop over the formula, with random prices
    and a padding mask (masked tokens left out)."""
    g = torch.Generator().manual_seed(seed)
    s_TE = torch.rand(T, E, generator=g)
    beta_E = 0.1 * torch.randn(E, generator=g)
    mask_T = torch.rand(T, generator=g) > 0.2
    mask_T[0] = True
    got = bl.quantile_prices(s_TE, beta_E, k)
    torch.testing.assert_close(got, _quantile_reference(s_TE, beta_E, k), rtol=0, atol=1e-6)
    got = bl.quantile_prices(s_TE, beta_E, k, mask=mask_T)
    torch.testing.assert_close(got, _quantile_reference(s_TE, beta_E, k, mask_T), rtol=0, atol=1e-6)


def test_quantile_prices_give_each_expert_its_share_at_the_old_cutoffs():
    """At the new prices (and the old per-token cutoffs) at most C = ⌈T·k/E⌉ tokens strictly
    prefer each expert, and more than C at or above the price (ties: a token whose (k+1)-th
    choice is the expert sits exactly at 0)."""
    g = torch.Generator().manual_seed(5)
    T, E, k = 64, 8, 2
    s_TE = torch.rand(T, E, generator=g)
    beta_E = torch.zeros(E)
    cutoff_T1 = s_TE.topk(k + 1, dim=-1).values[:, k:]
    prices_E = bl.quantile_prices(s_TE, beta_E, k)
    C = math.ceil(T * k / E)
    assert ((s_TE - cutoff_T1 > prices_E).sum(0) <= C).all()
    assert ((s_TE - cutoff_T1 >= prices_E).sum(0) > C).all()


def test_quantile_prices_refuse_k_equal_to_the_number_of_experts():
    with pytest.raises(ValueError, match="k"):
        bl.quantile_prices(torch.rand(4, 3), torch.zeros(3), 3)


# ----------------------------------------------------------------------------- ReMoE L1


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_l1_loss_matches_a_loop_of_the_formula(seed):
    """ReMoE's load-balanced L1: (1/T)·Σ_t Σ_i f_i·R_ti, f_i = E·c_i/(k·T), c_i the tokens
    with R_ti > 0; padding left out of T, of c and of the sum."""
    T, E, k = 12, 6, 2
    g = torch.Generator().manual_seed(seed)
    gates_TE = torch.randn(T, E, generator=g).relu()
    mask_T = torch.rand(T, generator=g) > 0.25
    counts_E = ((gates_TE > 0) & mask_T[:, None]).sum(0)
    n = int(mask_T.sum())
    want = 0.0
    for t in range(T):
        for i in range(E):
            if mask_T[t]:
                want += E * int(counts_E[i]) / (k * n) * float(gates_TE[t, i])
    got = bl.relu_l1_loss(gates_TE, counts=counts_E, top_k=k, mask=mask_T)
    assert float(got) == approx(want / n)


def test_relu_l1_loss_is_the_plain_l1_at_balance_and_pushes_busy_experts_harder():
    """With every expert on k/E of the tokens f_i = 1 and the term is mean_t ||R_t||_1; the
    gradient on a gate is f_i/T, larger for the busier expert."""
    gates_TE = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    loss = bl.relu_l1_loss(gates_TE, counts=torch.tensor([1, 1]), top_k=1)
    assert float(loss) == approx(1.5)
    skewed = bl.relu_l1_loss(gates_TE, counts=torch.tensor([2, 0]), top_k=1)
    (g,) = torch.autograd.grad(skewed, gates_TE)
    assert g[:, 0].tolist() == approx([1.0, 1.0]) and g[:, 1].tolist() == approx([0.0, 0.0])


def test_adapt_l1_coef_moves_toward_k_experts_a_token():
    """λ·α while tokens use more than k experts, λ/α while fewer, unchanged at k (α = 1.2)."""
    assert bl.adapt_l1_coef(1.0, 3.5, top_k=2, rate=0.2) == approx(1.2)
    assert bl.adapt_l1_coef(1.0, 1.5, top_k=2, rate=0.2) == approx(1 / 1.2)
    assert bl.adapt_l1_coef(1.0, 2.0, top_k=2, rate=0.2) == 1.0


# ----------------------------------------------------------------------------- SimBal


def test_simbal_loss_matches_a_loop_and_is_zero_for_orthonormal_rows():
    """Σ_ij |⟨R_i, R_j⟩ − δ_ij| over the router rows R (E, D) (arXiv 2506.14038); 0 for
    orthonormal rows, with gradient into R."""
    R_ED = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    want = sum(abs(float(R_ED[i] @ R_ED[j]) - (i == j)) for i in range(4) for j in range(4))
    loss = bl.simbal_loss(R_ED)
    assert float(loss) == approx(want)
    loss.backward()
    assert R_ED.grad is not None and float(R_ED.grad.abs().sum()) > 0
    Q, _ = torch.linalg.qr(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)))
    assert float(bl.simbal_loss(Q.T)) == pytest.approx(0.0, abs=1e-5)
