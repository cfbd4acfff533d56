"""Specification tests for moelab.routing (CPU, fixed seeds, a few seconds in total)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.routing import Routing, anneal, relu_route, route, sinkhorn_route, top_p_route

T, D, E, K = 64, 16, 8, 2


def _logits(t: int = T, e: int = E, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(t, e, generator=torch.Generator().manual_seed(seed)) * scale


def _reference(logits_TE, k, score, normalize):
    """Plain loop reference: per token, score fn, sort, take k, optionally renormalise."""
    experts, weights = [], []
    for row in logits_TE.tolist():
        if score == "softmax":
            z = [math.exp(v - max(row)) for v in row]
            s = [v / sum(z) for v in z]
        else:
            s = [1 / (1 + math.exp(-v)) for v in row]
        order = sorted(range(len(s)), key=lambda i: -s[i])[:k]
        w = [s[i] for i in order]
        total = sum(w)
        experts.append(order)
        weights.append([v / total for v in w] if normalize else w)
    return torch.tensor(experts), torch.tensor(weights)


# ----------------------------------------------------------------------------- route()


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_route_matches_loop_reference(score, normalize):
    """route() picks the same experts (best first) and weights as a per-token loop."""
    logits = _logits()
    r = route(logits, K, score=score, normalize=normalize)
    ref_experts, ref_weights = _reference(logits, K, score, normalize)
    assert torch.equal(r.experts, ref_experts)
    torch.testing.assert_close(r.weights, ref_weights)
    assert r.experts.dtype == torch.int64 and r.num_experts == E and r.slots == K
    assert r.mask is None and r.clean_logits is None and r.noise_std is None


def test_topk_before_softmax_is_mixtral():
    """Mixtral: weights = softmax over the k selected logits; scores stay the full softmax."""
    logits = _logits()
    r = route(logits, K, topk_before_softmax=True)
    top = logits.topk(K, dim=-1)
    assert torch.equal(r.experts, top.indices)
    torch.testing.assert_close(r.weights, torch.softmax(top.values, dim=-1))
    torch.testing.assert_close(r.scores, logits.softmax(-1))


def test_bias_changes_selection_not_weights():
    """The loss-free bias moves selection; weights are the unbiased scores of the chosen experts."""
    logits = _logits()
    bias = torch.zeros(E)
    bias[E - 1] = 10.0  # force expert E-1 into every token's top-k
    r = route(logits, K, score="sigmoid", bias=bias, normalize=False)
    assert (r.experts == E - 1).any(-1).all()
    assert not torch.equal(r.experts, route(logits, K, score="sigmoid").experts)
    torch.testing.assert_close(r.weights, torch.sigmoid(logits).gather(1, r.experts))
    torch.testing.assert_close(r.scores, torch.sigmoid(logits))


def test_group_limited_stays_inside_chosen_groups():
    """With 4 groups of 2 and topk_groups=2, experts come from the 2 groups with best top-2 sums."""
    logits = _logits(e=8)
    r = route(logits, 3, score="sigmoid", num_groups=4, topk_groups=2)
    group_TG = torch.sigmoid(logits).view(T, 4, 2).sum(-1)  # top-2 of 2 = both
    best_TG = group_TG.topk(2, dim=-1).indices
    chosen_groups = r.experts // 2
    assert (chosen_groups.unsqueeze(-1) == best_TG.unsqueeze(1)).any(-1).all()


def test_group_limited_with_all_groups_equals_plain_topk():
    """topk_groups == num_groups keeps every group, i.e. plain top-k."""
    logits = _logits()
    plain = route(logits, K)
    grouped = route(logits, K, num_groups=4, topk_groups=4)
    assert torch.equal(plain.experts, grouped.experts)
    torch.testing.assert_close(plain.weights, grouped.weights)


def test_gradients_flow_to_logits_through_weights():
    """weights carry gradient back to the logits (every token row gets some)."""
    logits = _logits().requires_grad_()
    r = route(logits, K, normalize=False)
    (r.weights * torch.randn_like(r.weights)).sum().backward()
    assert logits.grad is not None and (logits.grad.abs().sum(-1) > 0).all()


@settings(max_examples=30, deadline=None)
@given(
    t=st.integers(1, 12),
    e=st.integers(1, 9),
    data=st.data(),
    score=st.sampled_from(["softmax", "sigmoid"]),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_route_properties(t, e, data, score, normalize, seed):
    """Property: experts distinct and in range, weights >= 0, sum to 1 when normalised."""
    k = data.draw(st.integers(1, e))
    r = route(_logits(t, e, seed, scale=3.0), k, score=score, normalize=normalize)
    assert r.experts.shape == r.weights.shape == (t, k)
    assert ((r.experts >= 0) & (r.experts < e)).all()
    assert all(len(set(row)) == k for row in r.experts.tolist())
    assert (r.weights >= 0).all()
    if normalize:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(t))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (
            dict(logits=_logits(e=4), k=5),
            "top_k=5 is out of range; allowed: an integer in [1, num_experts=4]",
        ),
        (dict(logits=_logits(), k=0), "top_k=0"),
        (dict(logits=torch.zeros(2, 3, E), k=1), "logits"),
        (dict(logits=_logits(), k=1, bias=torch.zeros(E + 1)), "bias"),
        (dict(logits=_logits(), k=1, score="relu"), "score"),
        (dict(logits=_logits(), k=1, num_groups=3), "num_groups"),
        (dict(logits=_logits(), k=1, num_groups=4, topk_groups=5), "topk_groups"),
        (dict(logits=_logits(), k=5, num_groups=4, topk_groups=2), "top_k"),
    ],
)
def test_route_validation_names_the_field(kwargs, field):
    """Bad arguments raise ValueError whose message names the field (and allowed values)."""
    with pytest.raises(ValueError, match="allowed") as info:
        route(**kwargs)
    assert field in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_route_rejects_non_finite_logits(bad):
    """NaN or inf router logits raise a clear ValueError."""
    logits = _logits()
    logits[3, 2] = bad
    with pytest.raises(ValueError, match="router logits contain NaN or inf"):
        route(logits, K)


def test_anneal_is_linear_to_zero():
    """anneal: 1 at step 0, 0.5 halfway, 0 at and after the end; constant 1 for steps = 0."""
    assert [anneal(s, 10) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    assert anneal(123, 0) == 1.0


def test_sinkhorn_more_balanced_than_topk_on_skewed_logits():
    """On logits skewed toward two experts, Sinkhorn selection has a lower max load than top-k,
    and its weights are still the unbalanced scores (with gradient)."""
    logits = _logits(t=256, seed=4)
    logits[:, :2] += 3.0
    logits.requires_grad_()
    plain = route(logits, K)
    balanced = sinkhorn_route(logits, K, iters=10)
    max_load = lambda r: torch.bincount(r.experts.flatten(), minlength=E).max().item()
    assert max_load(balanced) < 0.6 * max_load(plain)
    scores = logits.softmax(-1).gather(1, balanced.experts)
    torch.testing.assert_close(balanced.weights, scores / scores.sum(-1, keepdim=True))
    balanced.weights.sum().backward()
    assert logits.grad is not None


def test_routing_is_frozen():
    """Routing is an immutable record."""
    r = route(_logits(), K)
    assert isinstance(r, Routing)
    with pytest.raises(AttributeError):
        r.weights = r.weights  # type: ignore[misc]


# ----------------------------------------------------------------------------- top-p, ReLU


@pytest.mark.parametrize("p", [0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_top_p_matches_a_loop_of_the_formula(p, normalize):
    """Huang et al. 2024: per token, experts sorted by softmax probability are taken while the
    mass of the ones before is below p; weights the probabilities (renormalised or not)."""
    logits_TE = _logits(scale=2.0)
    r = top_p_route(logits_TE, p, normalize=normalize)
    for t, row in enumerate(logits_TE.softmax(-1).tolist()):
        order = sorted(range(E), key=lambda i: -row[i])
        taken, mass = [], 0.0
        for i in order:
            if mass >= p:
                break
            taken.append(i)
            mass += row[i]
        n = int(r.mask[t].sum())
        assert r.experts[t, :n].tolist() == taken and not r.mask[t, n:].any()
        w = [row[i] / (mass if normalize else 1.0) for i in taken]
        torch.testing.assert_close(r.weights[t, :n], torch.tensor(w), rtol=1e-5, atol=1e-7)
        assert float(r.weights[t, n:].abs().sum()) == 0.0


def test_top_p_takes_more_experts_for_flatter_tokens_and_at_least_one():
    """A confident token takes one expert, a uniform token ceil(p·E); p = 1 takes all."""
    logits_TE = torch.tensor([[9.0] + [0.0] * (E - 1), [0.0] * E])
    r = top_p_route(logits_TE, 0.5)
    assert r.mask.sum(-1).tolist() == [1, math.ceil(0.5 * E)]
    assert top_p_route(logits_TE, 1.0).mask.sum(-1).tolist() == [E, E]
    with pytest.raises(ValueError, match="p=0"):
        top_p_route(logits_TE, 0.0)


def test_relu_route_gates_are_the_positive_logits():
    """ReMoE: weights = ReLU(logits) in expert order, used slots = positive gates (a token may
    get none), with gradient into the positive logits only."""
    logits_TE = _logits().requires_grad_()
    r = relu_route(logits_TE)
    assert torch.equal(r.experts, torch.arange(E).expand(T, E))
    assert torch.equal(r.weights, logits_TE.detach().clamp_min(0))
    assert torch.equal(r.mask, logits_TE.detach() > 0)
    r.weights.sum().backward()
    assert torch.equal(logits_TE.grad, (logits_TE.detach() > 0).float())
    assert int(relu_route(-logits_TE.detach().abs()).mask.sum()) == 0
