"""Specification of moelab.placement: EPLB-style placement and the expert-parallel simulator."""

import json

import pytest
import torch

from moelab import placement as pl


def _skewed_load(E: int = 16) -> torch.Tensor:
    """Zipf-like load: a few hot experts, contiguous hot experts land on one device."""
    return torch.tensor([1000.0 / (e + 1) for e in range(E)])


def test_contiguous_placement_matches_the_ep_layout():
    """Expert e on device e // (E/G); with G > E each expert has G/E replicas."""
    p = pl.contiguous_placement(8, 2)
    assert p.hosts_GE.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]
    q = pl.contiguous_placement(2, 4)
    assert q.replicas_E.tolist() == [2, 2] and q.hosts_GE.sum(1).tolist() == [1, 1, 1, 1]


def test_greedy_packing_beats_contiguous_on_skewed_loads():
    """Longest-processing-time packing lowers the max device load (same experts per device)."""
    load = _skewed_load()
    for G in (2, 4, 8):
        contiguous = pl.contiguous_placement(16, G).device_load(load).max()
        greedy = pl.greedy_placement(load, G, redundant=0)
        assert greedy.hosts_GE.sum(1).tolist() == [16 // G] * G
        assert greedy.replicas_E.tolist() == [1] * 16
        assert greedy.device_load(load).max() < contiguous
        torch.testing.assert_close(greedy.device_load(load).sum(), load.double().sum())


def test_replicas_of_hot_experts_lower_the_max_device_load():
    """Extra replicas go to the hottest experts and cut the max device load further."""
    load = _skewed_load()
    plain = pl.greedy_placement(load, 8, redundant=0).device_load(load).max()
    with_replicas = pl.greedy_placement(load, 8, redundant=1)
    assert with_replicas.replicas_E[0] == with_replicas.replicas_E.max() > 1
    assert with_replicas.device_load(load).max() < plain
    assert pl.replicate(torch.tensor([4.0, 1.0]), 4).tolist() == [3, 1]


def test_simulated_bytes_equal_a_hand_computation():
    """E=4 on G=2 (experts 0,1 | 2,3), 4 tokens K=1: tokens 0,1 on device 0, tokens 2,3 on
    device 1; routed to experts 0,2 | 3,1 -> 2 slots leave their device; × D × 2 B × 2."""
    trace = {"experts": [torch.tensor([[0], [2], [3], [1]])], "num_experts": 4, "d_model": 8}
    stats = pl.layer_stats(
        trace["experts"][0], 4, pl.contiguous_placement(4, 2), d_model=8, bytes_per_elt=2
    )
    assert stats["a2a_bytes"] == 2 * 8 * 2 * 2
    assert stats["load_G"].tolist() == [2.0, 2.0] and stats["straggler"] == 1.0
    one = pl.layer_stats(
        trace["experts"][0], 4, pl.contiguous_placement(4, 1), d_model=8, bytes_per_elt=2
    )
    assert one["a2a_bytes"] == 0


def test_simulate_ep_rows_cover_sizes_beyond_the_expert_count():
    """Every EP size gets a row (replication past E); rebalancing never raises the straggler
    factor much on a skewed trace and a single device sends nothing."""
    g = torch.Generator().manual_seed(0)
    probs = _skewed_load(8) / _skewed_load(8).sum()
    experts = torch.multinomial(probs, 4096 * 2, replacement=True, generator=g).view(4096, 2)
    trace = {"experts": [experts, experts.flip(0)], "num_experts": 8, "d_model": 16}
    static = pl.simulate_ep(trace, (1, 2, 4, 16), rebalance=False)
    rebal = pl.simulate_ep(trace, (1, 2, 4, 16), rebalance=True)
    assert [r.ep for r in static] == [1, 2, 4, 16]
    assert static[0].a2a_bytes == 0 and static[0].straggler == pytest.approx(1.0)
    assert len(static[-1].device_load) == 16
    for s, r in zip(static[1:], rebal[1:], strict=True):
        assert r.straggler < s.straggler
    counts = pl.simulate_ep({"counts": [[10, 10, 10, 10]], "num_experts": 4, "d_model": 4}, (2,))
    assert counts[0].straggler == pytest.approx(1.0)


def test_simulate_ep_cli_writes_table_json_and_plot(tmp_path, capsys):
    """`moelab simulate-ep TRACE --out DIR` on a saved trace."""
    from moelab.cli import main

    experts = torch.randint(0, 4, (512, 2), generator=torch.Generator().manual_seed(1))
    trace = {
        "format": pl.TRACE_FORMAT,
        "experts": [experts.to(torch.int16)],
        "num_experts": 4,
        "top_k": 2,
        "d_model": 8,
        "source": "synthetic",
        "step": 0,
    }
    torch.save(trace, tmp_path / "t.pt")
    assert main(["simulate-ep", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o")]) == 0
    rows = json.loads((tmp_path / "o" / "simulate_ep.json").read_text())["rows"]
    assert {r["ep"] for r in rows} == set(pl.DEFAULT_EP_SIZES) and len(rows) == 18
    assert (tmp_path / "o" / "simulate_ep.png").stat().st_size > 1000
    assert "| 256 | rebalanced |" in (tmp_path / "o" / "simulate_ep.md").read_text()
    assert main(["simulate-ep", str(tmp_path / "missing.pt"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
