"""Tests for moelab.metrics: hand-computed values, plain-loop references and properties."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab import metrics as M

# ----------------------------------------------------------------------------- counts and MaxVio


def test_expert_counts_by_hand_with_token_and_slot_masks():
    """Counts are slots per expert; masked tokens and masked slots are not counted."""
    experts_TK = torch.tensor([[0, 1], [1, 2], [1, 3]])
    assert M.expert_counts(experts_TK, 4).tolist() == [1, 3, 1, 1]
    mask_T = torch.tensor([True, True, False])
    assert M.expert_counts(experts_TK, 4, mask=mask_T).tolist() == [1, 2, 1, 0]
    slot_TK = torch.tensor([[True, False], [True, True], [False, True]])
    assert M.expert_counts(experts_TK, 4, mask=slot_TK).tolist() == [1, 1, 1, 1]
    assert M.expert_counts(experts_TK, 4).dtype == torch.int64


def test_expert_counts_rejects_bad_ids_and_mask_shape():
    """Ids outside [0, E) and masks of the wrong shape raise ValueError."""
    with pytest.raises(ValueError, match="expert ids"):
        M.expert_counts(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match="mask shape"):
        M.expert_counts(torch.tensor([[0, 1]]), 4, mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([2, 2, 2, 2], 0.0),  # balanced
        ([3, 1, 1, 1], 1.0),  # mean 1.5: (3 - 1.5) / 1.5
        ([4, 0, 0, 0], 3.0),  # all on one expert: E - 1
        ([5, 3], 0.25),  # mean 4: (5 - 4) / 4
        ([0, 0, 0], 0.0),  # no tokens: defined as 0
    ],
)
def test_max_violation_by_hand(counts, expected):
    """MaxVio = (max - mean) / mean for hand-computed count vectors."""
    assert M.max_violation(torch.tensor(counts)).item() == pytest.approx(expected)


def test_max_violation_reduces_last_dim():
    """A (B, E) batch of count vectors gives one MaxVio per row."""
    out = M.max_violation(torch.tensor([[3, 1, 1, 1], [2, 2, 2, 2]]))
    assert out.tolist() == pytest.approx([1.0, 0.0])


def test_maxvio_per_sequence_by_hand_and_mask():
    """Each sequence counts only its own unmasked tokens."""
    experts_BLK = torch.tensor([[[0], [1]], [[0], [0]]])  # E=2, K=1
    assert M.maxvio_per_sequence(experts_BLK, 2).tolist() == pytest.approx([0.0, 1.0])
    # seq 0 keeps only token 0 -> counts [1, 0] -> (1 - 0.5) / 0.5 = 1
    mask_BL = torch.tensor([[True, False], [True, True]])
    assert M.maxvio_per_sequence(experts_BLK, 2, mask_BL=mask_BL).tolist() == pytest.approx(
        [1.0, 1.0]
    )


def test_maxvio_by_chunks_equals_loop():
    """maxvio_by_chunks equals MaxVio of expert_counts over each chunk; partial chunk dropped."""
    g = torch.Generator().manual_seed(0)
    experts_TK = torch.randint(0, 8, (103, 2), generator=g)
    out = M.maxvio_by_chunks(experts_TK, 8, 10)
    ref = [M.max_violation(M.expert_counts(experts_TK[i : i + 10], 8)) for i in range(0, 100, 10)]
    assert out.shape == (10,)
    torch.testing.assert_close(out, torch.stack(ref))


def test_maxvio_by_chunks_rejects_bad_chunk():
    """chunk_tokens < 1 or > T raises a ValueError naming the argument."""
    experts_TK = torch.zeros(5, 1, dtype=torch.int64)
    for bad in (0, 6):
        with pytest.raises(ValueError, match="chunk_tokens"):
            M.maxvio_by_chunks(experts_TK, 2, bad)


def test_maxvio_of_uniform_routing_falls_like_inverse_sqrt_chunk():
    """Uniform random routing: mean MaxVio over chunks ~ 1/sqrt(n) (sampling noise, Wang §5.1).

    A log-log fit over chunk sizes 2^7 … 2^13 tokens gives slope ≈ -0.5 (loose bounds).
    """
    g = torch.Generator().manual_seed(0)
    experts_TK = torch.randint(0, 16, (2**17, 2), generator=g)
    sizes = [2**p for p in range(7, 14)]
    means = [M.maxvio_by_chunks(experts_TK, 16, n).mean().item() for n in sizes]
    slope = np.polyfit(np.log(sizes), np.log(means), 1)[0]
    assert -0.6 < slope < -0.4


# ----------------------------------------------------------------------------- CV, shares, dead


def test_cv_by_hand_and_against_numpy():
    """CV uses the population std: [3,1,1,1] -> sqrt(0.75)/1.5 = 1/sqrt(3); 0 when mean is 0."""
    assert M.cv(torch.tensor([3, 1, 1, 1])).item() == pytest.approx(1 / math.sqrt(3))
    assert M.cv(torch.tensor([2.0, 2.0])).item() == 0.0
    assert M.cv(torch.zeros(4)).item() == 0.0
    x = np.random.default_rng(0).random(10)
    assert M.cv(torch.tensor(x)).item() == pytest.approx(x.std() / x.mean(), rel=1e-5)


def test_load_share_and_max_over_mean_by_hand():
    """[3,1,1,1]: shares min 1/6, max 1/2; max/mean = 3/1.5 = 2 = 1 + MaxVio."""
    share = M.load_share(torch.tensor([3, 1, 1, 1]))
    assert share.min.item() == pytest.approx(1 / 6)
    assert share.max.item() == pytest.approx(1 / 2)
    assert M.max_over_mean(torch.tensor([3, 1, 1, 1])).item() == pytest.approx(2.0)
    assert M.load_share(torch.zeros(3)).max.item() == 0.0


def test_dead_experts_threshold_is_relative_to_uniform_share():
    """Shares [.5, 0, .05, .45]: threshold 0 -> only the unused one; 0.2 × 1/4 = .05 -> two."""
    counts = torch.tensor([10, 0, 1, 9])
    assert M.dead_experts(counts).tolist() == [False, True, False, False]
    assert M.dead_experts(counts, threshold=0.2).tolist() == [False, True, True, False]
    assert M.dead_experts(torch.zeros(3)).all()


def test_group_imbalance_by_hand():
    """Counts [3,1,1,1,2,0,0,0]: 2 groups [6,2] -> 0.5; 4 groups [4,2,2,0] -> 1.0."""
    counts = torch.tensor([3, 1, 1, 1, 2, 0, 0, 0])
    assert M.group_imbalance(counts, 2).item() == pytest.approx(0.5)
    assert M.group_imbalance(counts, 4).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_groups"):
        M.group_imbalance(counts, 3)


def test_drop_rate():
    """3 of 12 slots dropped -> 0.25; no slots -> 0.0; impossible values raise."""
    assert M.drop_rate(3, 12) == 0.25
    assert M.drop_rate(torch.tensor(3), torch.tensor(12)) == 0.25
    assert M.drop_rate(0, 0) == 0.0
    with pytest.raises(ValueError):
        M.drop_rate(5, 4)


# ----------------------------------------------------------------------------- tracker


def test_tracker_counts_tokens_since_last_hit_and_window():
    """Hit experts reset to 0, others gain the batch's tokens; window keeps the last 2 updates."""
    tracker = M.DeadExpertTracker(3, window=2)
    tracker.update(torch.tensor([2, 0, 0]))  # 2 tokens
    assert tracker.tokens_since_last_hit.tolist() == [0, 2, 2]
    tracker.update(torch.tensor([0, 3, 0]))  # 3 tokens
    assert tracker.tokens_since_last_hit.tolist() == [3, 0, 5]
    tracker.update(torch.tensor([1, 0, 0]), num_tokens=4)
    assert tracker.tokens_since_last_hit.tolist() == [0, 4, 9]
    assert tracker.window_counts.tolist() == [1, 3, 0]
    assert tracker.dead().tolist() == [False, False, True]
    # shares [.25, .75, 0] vs uniform 1/3: threshold 0.8 -> .267 -> expert 0 counts as dead too
    assert tracker.dead(0.8).tolist() == [True, False, True]


def test_tracker_state_dict_round_trips_through_torch_save():
    """A tracker restored from a saved state_dict continues exactly like the original."""
    g = torch.Generator().manual_seed(1)
    a = M.DeadExpertTracker(4, window=3, top_k=2)
    for _ in range(5):
        a.update(M.expert_counts(torch.randint(0, 3, (6, 2), generator=g), 4))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = M.DeadExpertTracker(4)
    b.load_state_dict(torch.load(buf))
    nxt = torch.tensor([0, 0, 2, 2])
    a.update(nxt)
    b.update(nxt)
    assert torch.equal(a.tokens_since_last_hit, b.tokens_since_last_hit)
    assert torch.equal(a.window_counts, b.window_counts)
    assert a.num_updates == b.num_updates == 6 and b.window == 3
    with pytest.raises(ValueError, match="num_experts"):
        M.DeadExpertTracker(5).load_state_dict(a.state_dict())


# ----------------------------------------------------------------------------- routing distribution


def test_routing_entropy_by_hand():
    """Uniform: both log 4. Two one-hot tokens on different experts: token 0, batch log 2.

    Sigmoid scores [0.5, 0.5] are normalised to [.5, .5] -> log 2.
    """
    ent = M.routing_entropy(torch.full((3, 4), 0.25))
    assert ent.token.item() == pytest.approx(math.log(4))
    assert ent.batch.item() == pytest.approx(math.log(4))
    ent = M.routing_entropy(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert ent.token.item() == pytest.approx(0.0)
    assert ent.batch.item() == pytest.approx(math.log(2))
    assert M.routing_entropy(torch.tensor([[0.5, 0.5]])).token.item() == pytest.approx(math.log(2))


def test_topk_mass_by_hand():
    """[[.5,.3,.2] pick 0,1 -> .8], [[.1,.1,.8] pick 2,0 -> .9] -> mean .85; unnormalised ok."""
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert M.topk_mass(scores, torch.tensor([[0, 1], [2, 0]])).item() == pytest.approx(0.85)
    sigmoid = torch.tensor([[1.0, 1.0, 2.0]])
    assert M.topk_mass(sigmoid, torch.tensor([[2]])).item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------- stability


def test_routing_fluctuation_and_set_change_by_hand():
    """Top-1 [0,1,2,3] vs [0,1,3,2] -> 0.5; sets {0,1},{1,2} vs {1,0},{2,3}: top-1 1.0, sets 0.5."""
    assert M.routing_fluctuation(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 3, 2])) == 0.5
    a = torch.tensor([[0, 1], [1, 2]])
    b = torch.tensor([[1, 0], [2, 3]])
    assert M.routing_fluctuation(a, b) == 1.0
    assert M.topk_set_change(a, b) == 0.5
    assert M.topk_set_change(a, a) == 0.0


def test_router_saturation_by_hand():
    """Identical snapshots -> 1.0; overlaps 1/2 and 0/2 -> 0.25."""
    a = torch.tensor([[0, 1], [2, 3]])
    assert M.router_saturation(a, a) == 1.0
    assert M.router_saturation(a, torch.tensor([[1, 5], [4, 6]])) == 0.25


def test_last_change_step_and_fraction_after_by_hand():
    """Top-1 over steps 0,10,20,30: token 0 never changes (-> 0), token 1 -> 10, token 2 -> 20."""
    snaps = [torch.tensor([1, 0, 2]), torch.tensor([1, 2, 2]), torch.tensor([1, 1, 0])]
    snaps.append(torch.tensor([1, 1, 2]))
    steps = [0, 10, 20, 30]
    last = M.last_change_step(snaps, steps)
    assert last.tolist() == [0, 10, 20]
    assert M.fraction_changed_after(last, steps, 0.5) == pytest.approx(1 / 3)  # > 15
    assert M.fraction_changed_after(last, steps, 0.2) == pytest.approx(2 / 3)  # > 6
    with pytest.raises(ValueError, match="increasing"):
        M.last_change_step(snaps, [0, 10, 10, 30])


# ----------------------------------------------------------------------------- specialisation


def test_coactivation_by_hand_symmetric_diagonal_counts():
    """[[0,1],[1,2],[0,1]] -> [[2,2,0],[2,3,1],[0,1,1]]; symmetric, diagonal = expert_counts."""
    experts_TK = torch.tensor([[0, 1], [1, 2], [0, 1]])
    co = M.coactivation(experts_TK, 3)
    assert co.tolist() == [[2, 2, 0], [2, 3, 1], [0, 1, 1]]
    g = torch.Generator().manual_seed(2)
    experts_TK = torch.rand(50, 6, generator=g).topk(3, dim=-1).indices
    co = M.coactivation(experts_TK, 6)
    assert torch.equal(co, co.T)
    assert torch.equal(co.diagonal(), M.expert_counts(experts_TK, 6))


def test_mutual_information_extremes():
    """MI = 0 when every (domain, expert) pair is equally frequent; log2 D with private experts."""
    domains_T = torch.arange(2).repeat_interleave(4)  # 2 domains × 4 experts, each pair once
    experts_TK = torch.arange(4).repeat(2).unsqueeze(-1)
    assert M.mutual_information(domains_T, experts_TK, 2, 4) == pytest.approx(0.0, abs=1e-12)
    domains_T = torch.arange(4).repeat_interleave(5)  # domain d uses experts {2d, 2d+1}
    experts_TK = torch.stack([2 * domains_T, 2 * domains_T + 1], dim=-1)
    assert M.mutual_information(domains_T, experts_TK, 4, 8) == pytest.approx(2.0)


def test_mutual_information_small_for_independent_random_routing():
    """Independent uniform draws: plug-in MI ≈ (D-1)(E-1)/(2 N ln 2) bits, far below 0.01."""
    g = torch.Generator().manual_seed(3)
    domains_T = torch.randint(0, 4, (20000,), generator=g)
    experts_TK = torch.randint(0, 8, (20000, 2), generator=g)
    assert M.mutual_information(domains_T, experts_TK, 4, 8) < 0.01


def test_domain_expert_freq_by_hand():
    """Rows are P(expert | domain) over slots; a domain with no tokens is a zero row."""
    domains_T = torch.tensor([0, 0, 1])
    experts_TK = torch.tensor([[0, 1], [0, 2], [2, 1]])
    freq = M.domain_expert_freq(domains_T, experts_TK, 3, 3)
    expected = [[0.5, 0.25, 0.25], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(freq, torch.tensor(expected, dtype=torch.float64))


# ----------------------------------------------------------------------------- masks


def test_mask_equals_computing_on_the_subset():
    """Every token-level metric with a mask equals the same metric on the kept tokens only."""
    g = torch.Generator().manual_seed(4)
    T, E = 40, 6
    scores_TE = torch.rand(T, E, generator=g)
    experts_TK = scores_TE.topk(2, dim=-1).indices
    other_TK = torch.rand(T, E, generator=g).topk(2, dim=-1).indices
    domains_T = torch.randint(0, 3, (T,), generator=g)
    mask_T = torch.rand(T, generator=g) > 0.3
    sub = lambda x: x[mask_T]
    pairs = [
        (M.expert_counts(experts_TK, E, mask=mask_T), M.expert_counts(sub(experts_TK), E)),
        (M.coactivation(experts_TK, E, mask=mask_T), M.coactivation(sub(experts_TK), E)),
        (
            M.topk_mass(scores_TE, experts_TK, mask=mask_T),
            M.topk_mass(*map(sub, (scores_TE, experts_TK))),
        ),
        (
            M.routing_fluctuation(experts_TK, other_TK, mask=mask_T),
            M.routing_fluctuation(sub(experts_TK), sub(other_TK)),
        ),
        (
            M.topk_set_change(experts_TK, other_TK, mask=mask_T),
            M.topk_set_change(sub(experts_TK), sub(other_TK)),
        ),
        (
            M.router_saturation(experts_TK, other_TK, mask=mask_T),
            M.router_saturation(sub(experts_TK), sub(other_TK)),
        ),
        (
            M.mutual_information(domains_T, experts_TK, 3, E, mask=mask_T),
            M.mutual_information(sub(domains_T), sub(experts_TK), 3, E),
        ),
        (
            M.domain_expert_freq(domains_T, experts_TK, 3, E, mask=mask_T),
            M.domain_expert_freq(sub(domains_T), sub(experts_TK), 3, E),
        ),
    ]
    pairs += list(
        zip(
            M.routing_entropy(scores_TE, mask=mask_T),
            M.routing_entropy(sub(scores_TE)),
            strict=True,
        )
    )
    chunked = M.maxvio_by_chunks(experts_TK, E, 20, mask=mask_T)
    halves = [experts_TK[i : i + 20][mask_T[i : i + 20]] for i in (0, 20)]
    halves = [M.max_violation(M.expert_counts(h, E)) for h in halves]
    pairs.append((chunked, torch.stack(halves)))
    for masked, subset in pairs:
        torch.testing.assert_close(torch.as_tensor(masked), torch.as_tensor(subset))


# ----------------------------------------------------------------------------- properties


@settings(max_examples=50, deadline=None)
@given(
    T=st.integers(0, 30),
    K=st.integers(1, 4),
    E=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_counts_sum_to_kept_slots(T, K, E, seed):
    """Σ counts = T·K minus masked slots, for token masks and slot masks alike."""
    g = torch.Generator().manual_seed(seed)
    experts_TK = torch.randint(0, E, (T, K), generator=g)
    mask_T = torch.rand(T, generator=g) > 0.5
    slot_TK = torch.rand(T, K, generator=g) > 0.5
    assert M.expert_counts(experts_TK, E).sum() == T * K
    assert M.expert_counts(experts_TK, E, mask=mask_T).sum() == T * K - K * int((~mask_T).sum())
    assert M.expert_counts(experts_TK, E, mask=slot_TK).sum() == int(slot_TK.sum())


@settings(max_examples=50, deadline=None)
@given(
    counts=st.lists(st.integers(0, 1000), min_size=1, max_size=16),
    scale=st.integers(1, 50),
)
def test_max_violation_nonnegative_scale_and_permutation_invariant(counts, scale):
    """MaxVio ≥ 0, ≤ E - 1, unchanged by scaling all counts or permuting experts; same for CV."""
    c = torch.tensor(counts)
    mv = M.max_violation(c)
    assert 0.0 <= mv.item() <= len(counts) - 1 + 1e-5
    torch.testing.assert_close(M.max_violation(c * scale), mv)
    torch.testing.assert_close(M.max_violation(c.flip(0)), mv)
    torch.testing.assert_close(M.cv(c * scale), M.cv(c))


# ----------------------------------------------------------------------------- issue 19 metrics


def test_top_n_share_is_the_busiest_experts_share():
    """Top-N coverage: share of slots of the n busiest experts; n/E at uniform load."""
    assert float(M.top_n_share(torch.tensor([5, 1, 3, 1]), 2)) == pytest.approx(0.8)
    assert float(M.top_n_share(torch.full((8,), 3), 2)) == pytest.approx(0.25)
    assert float(M.top_n_share(torch.zeros(4), 1)) == 0.0
    with pytest.raises(ValueError, match="n=5"):
        M.top_n_share(torch.ones(4), 5)


def test_router_similarity_is_the_cosine_of_distinct_rows():
    """Mean and max cosine over pairs of distinct router rows, against a loop."""
    R_ED = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    cos = [
        float(torch.nn.functional.cosine_similarity(R_ED[i], R_ED[j], dim=0))
        for i in range(5)
        for j in range(5)
        if i != j
    ]
    got = M.router_similarity(R_ED)
    assert got.mean == pytest.approx(sum(cos) / len(cos), rel=1e-5)
    assert got.max == pytest.approx(max(cos), rel=1e-5)
    assert M.router_similarity(torch.eye(3)) == (0.0, 0.0)


def test_experts_per_token_counts_used_slots_of_real_tokens():
    """Used slots per real token (padding left out); 0 = no expert."""
    slots_TK = torch.tensor([[True, False], [True, True], [False, False]])
    assert M.experts_per_token(slots_TK).tolist() == [1, 2, 0]
    assert M.experts_per_token(slots_TK, torch.tensor([True, False, True])).tolist() == [1, 0]


def test_next_layer_predictability_and_routing_agreement():
    """A next layer that permutes the first layer's top-1 is predicted exactly; an independent
    one only as well as its most common expert. Agreement is |A ∩ B| / |A| over valid slots."""
    g = torch.Generator().manual_seed(0)
    E, T = 4, 4000
    first = torch.randint(0, E, (T, 2), generator=g)
    perm = torch.tensor([2, 0, 3, 1])
    table = M.top1_transitions(first, perm[first], E)
    assert table.sum() == T and M.next_layer_predictability(table)[0] == 1.0
    other = torch.randint(0, E, (T, 2), generator=g)
    acc, base = M.next_layer_predictability(M.top1_transitions(first, other, E))
    assert abs(acc - base) < 0.05 and 0.25 <= base < 0.3
    valid = torch.arange(T) % 2 == 0
    assert M.top1_transitions(first, other, E, mask_T=valid).sum() == T // 2
    assert math.isnan(M.next_layer_predictability(torch.zeros(E, E))[0])
    a = torch.tensor([[0, 1], [2, 3]])
    assert M.routing_agreement(a, a, E) == 1.0
    assert M.routing_agreement(a, torch.tensor([[0, 2], [3, 1]]), E) == 0.5
    b = torch.tensor([[1, 0], [3, 2]])
    b_mask = torch.tensor([[False, True], [True, True]])  # b's expert 1 of token 0 is unused
    assert M.routing_agreement(a, b, E) == 1.0
    assert M.routing_agreement(a, b, E, b_mask=b_mask) == 0.75
    a_mask = torch.tensor([[True, True], [False, False]])
    assert M.routing_agreement(a, a, E, a_mask=a_mask) == 1.0
    assert math.isnan(M.routing_agreement(a, a, E, a_mask=torch.zeros(2, 2, dtype=bool)))
