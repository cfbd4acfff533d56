"""moelab.ep's pure parts: the EP × DP layout, the all-to-all split sizes and per-rank loads,
against brute force over every rank (the collectives and the layer: tests/test_parallel.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.ep import Layout, exchange_plan, rank_loads


def test_layout_places_experts_and_groups():
    """W=4, P=2: rank 3 is the second shard of EP group {2, 3} and shares experts with rank 1."""
    lay = Layout(rank=3, world_size=4, ep=2)
    assert lay.ep_index == 1 and lay.ep_ranks == [2, 3] and lay.expert_dp_ranks == [1, 3]
    assert lay.expert_slice(8) == slice(4, 8)


@st.composite
def kept_counts(draw):
    ep = draw(st.sampled_from([1, 2, 4]))
    W = ep * draw(st.integers(1, 2))
    E = ep * draw(st.integers(1, 3))
    values = draw(st.lists(st.integers(0, 5), min_size=W * E, max_size=W * E))
    return torch.tensor(values).view(W, E), ep


@settings(max_examples=60, deadline=None)
@given(kept_counts())
def test_exchange_plan_matches_every_ranks_view(case):
    """What rank i sends to j is what j receives from i; each rank receives exactly the kept
    slots of its EP group for its own experts, and order_R groups them by local expert."""
    kept_WE, ep = case
    W, E = kept_WE.shape
    plans = [exchange_plan(kept_WE, Layout(r, W, ep)) for r in range(W)]
    for r, plan in enumerate(plans):
        lay = Layout(r, W, ep)
        mine = kept_WE[lay.ep_ranks][:, lay.expert_slice(E)]  # (P, El)
        for j, peer in enumerate(lay.ep_ranks):
            assert plan.send[j] == plans[peer].recv[lay.ep_index]
        assert plan.recv == mine.sum(1).tolist()
        assert plan.local_splits == mine.sum(0).tolist()
        labels_R = torch.arange(E // ep).repeat(ep).repeat_interleave(mine.reshape(-1))
        grouped = labels_R[plan.order_R]
        assert torch.equal(grouped, torch.sort(labels_R).values)
        assert torch.equal(grouped[plan.inverse_R], labels_R)


@settings(max_examples=60, deadline=None)
@given(kept_counts())
def test_rank_loads_sum_the_group_slots_for_each_ranks_experts(case):
    """rank_loads[r] = Σ over r's EP group of the slots kept for r's experts."""
    kept_WE, ep = case
    W, E = kept_WE.shape
    brute = [
        int(kept_WE[Layout(r, W, ep).ep_ranks][:, Layout(r, W, ep).expert_slice(E)].sum())
        for r in range(W)
    ]
    assert rank_loads(kept_WE, ep).tolist() == brute
