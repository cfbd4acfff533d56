"""Specification of moelab.dispatch: capacity, dropping, permute / unpermute."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab import dispatch
from moelab.experts import Experts


def _random_routing(T: int, E: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    # skew the load so that capacity actually binds
    logits[:, 0] += 1.5
    w, e = torch.softmax(logits, -1).topk(K, dim=-1)
    return e, w


def _loop_reference(experts_TK, weights_TK, E, cap, policy):
    """Plain per-slot loop: visit slots in priority order, keep while the expert has room."""
    T, K = experts_TK.shape
    slots = [(t, k) for t in range(T) for k in range(K)]
    if policy == "score":
        slots.sort(key=lambda s: -float(weights_TK[s]))
    else:
        slots.sort(key=lambda s: (s[1], s[0]))
    used = [0] * E
    kept = torch.zeros(T, K, dtype=torch.bool)
    for t, k in slots:
        e = int(experts_TK[t, k])
        if cap == 0 or used[e] < cap:
            used[e] += 1
            kept[t, k] = True
    return kept


def test_capacity_formula():
    """C = ceil(T·K/E·CF); CF = 0 means dropless; a negative factor is refused."""
    assert dispatch.capacity(100, 2, 8, 1.25) == math.ceil(100 * 2 / 8 * 1.25)
    assert dispatch.capacity(100, 2, 8, 0) == 0
    with pytest.raises(ValueError, match="capacity factor"):
        dispatch.capacity(100, 2, 8, -1)


@pytest.mark.parametrize("policy", ["score", "position"])
def test_drops_match_loop_reference(policy):
    """The vectorised capacity selection keeps exactly the slots a per-slot loop keeps."""
    e, w = _random_routing(64, 8, 2)
    cap = dispatch.capacity(64, 2, 8, 1.0)
    p = dispatch.plan(e, w, 8, capacity=cap, policy=policy)
    assert torch.equal(p.kept_TK, _loop_reference(e, w, 8, cap, policy))
    assert int(p.kept_E.max()) <= cap
    assert int(p.dropped) == int((~p.kept_TK).sum()) > 0


def test_bad_policy_is_refused():
    """An unknown drop policy names the allowed values."""
    e, w = _random_routing(8, 4, 1)
    with pytest.raises(ValueError, match="score"):
        dispatch.plan(e, w, 4, capacity=2, policy="random")


@pytest.mark.parametrize("cap_factor", [0.0, 1.0])
def test_sorted_dispatch_equals_naive_loop(cap_factor):
    """permute -> experts on segments -> unpermute equals a per-expert loop over masked tokens,
    in outputs and in gradients of x, gate weights and expert weights (with and without drops)."""
    torch.manual_seed(0)
    T, D, F, E, K = 48, 16, 24, 6, 2
    experts = Experts(E, D, F, init_std=0.1)
    x = torch.randn(T, D, requires_grad=True)
    logits = torch.randn(T, E, requires_grad=True)
    w, e = torch.softmax(logits, -1).topk(K, dim=-1)
    cap = dispatch.capacity(T, K, E, cap_factor)
    p = dispatch.plan(e, w, E, capacity=cap)
    y = dispatch.unpermute(experts(dispatch.permute(x, p), p.splits), p, T)
    y_ref = experts.forward_loop(x, e, w * p.kept_TK)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    params = [x, logits, experts.w13_ED2F, experts.w2_EFD]
    grads = torch.autograd.grad((y * g).sum(), params, retain_graph=True)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), params)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 40),
    E=st.integers(1, 8),
    K=st.integers(1, 3),
    cf=st.sampled_from([0.0, 0.5, 1.0, 1.25, 2.0]),
    policy=st.sampled_from(["score", "position"]),
    seed=st.integers(0, 1000),
)
def test_plan_properties(T, E, K, cf, policy, seed):
    """Properties: kept counts sum to T·K minus drops; capacity never exceeded; dropless keeps
    every slot; the permutation visits each kept slot once; permute/unpermute with unit
    weights and identity experts sums each token's kept slots."""
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
    w = torch.rand(T, K, generator=g)
    cap = dispatch.capacity(T, K, E, cf)
    p = dispatch.plan(e, w, E, capacity=cap, policy=policy)
    assert int(p.kept_E.sum()) == T * K - int(p.dropped)
    assert int(p.routed_E.sum()) == T * K
    if cap:
        assert int(p.kept_E.max()) <= cap
    else:
        assert int(p.dropped) == 0
    assert sorted(p.slot_S.tolist()) == p.kept_TK.reshape(-1).nonzero().squeeze(1).tolist()
    x = torch.randn(T, 3, generator=g)
    ones = dispatch.Plan(**{**p.__dict__, "weight_S": torch.ones_like(p.weight_S)})
    back = dispatch.unpermute(dispatch.permute(x, ones), ones, T)
    torch.testing.assert_close(back, x * p.kept_TK.sum(1, keepdim=True).to(x.dtype))


def test_masked_slots_are_neither_routed_nor_kept():
    """Slots masked out (padding) count nowhere and never reach an expert."""
    e, w = _random_routing(10, 4, 2)
    mask = torch.zeros(10, 2, dtype=torch.bool)
    mask[:5] = True
    p = dispatch.plan(e, w, 4, capacity=0, mask_TK=mask)
    assert int(p.routed_E.sum()) == 10
    assert set(p.token_S.tolist()) <= set(range(5))


def test_reroute_fills_spare_room_only():
    """Re-routing sends dropped slots to the next-best expert with room, never over capacity,
    and keeps every first-round slot."""
    T, E, K = 32, 4, 1
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(3))
    logits[:, 0] += 4.0  # everyone wants expert 0
    scores = torch.softmax(logits, -1)
    w, e = scores.topk(K, dim=-1)
    cap = dispatch.capacity(T, K, E, 1.0)
    first = dispatch.plan(e, w, E, capacity=cap)
    p = dispatch.plan_with_reroute(e, w, scores, E, capacity=cap, normalize=False)
    assert int(p.kept_E.max()) <= cap
    assert int(p.dropped) < int(first.dropped)
    assert torch.equal(p.routed_E, first.routed_E)
    assert bool((p.kept_TK | ~first.kept_TK).all())
