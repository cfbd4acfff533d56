"""The lab: experiment files parse and build, the CLI lists and runs them, verdict rules."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json

import pytest

from moelab.cli import build_parser
from moelab.lab.spec import (
    EXPERIMENTS,
    VERDICTS,
    Check,
    decide,
    experiment_names,
    load_experiment,
)

REQUIRED = {"name", "claim", "verdict", "measured", "paper", "batch_tokens",
            "tokens_per_expert_per_step"}  # fmt: skip


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_list_shows_every_experiment(capsys):
    """`lab list` prints one line per suite file (moelab/lab/experiments), ten and more."""
    args = _parse(["lab", "list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    names = experiment_names()
    assert len(names) >= 11
    for n in names:
        assert n in out


@pytest.mark.parametrize("name", experiment_names())
def test_experiment_parses_and_variants_build(name):
    """Every experiment has a claim, paper numbers, checks, and valid RunConfigs (quick too)."""
    exp = load_experiment(name)
    assert exp.claim and exp.paper and exp.checks and exp.variants
    for v in exp.variants:
        assert exp.run_config(v).model.moe is not None
    for v in exp.variant_names(quick=True):
        cfg = exp.run_config(v, quick=True)
        assert cfg.train.steps <= 20, "quick versions must stay CI-sized"


def test_deliberate_top1_renormalised_arms_build_without_the_warning():
    """Experiment 7b's k = 1 arms keep normalize=true on purpose: listing or analysing the
    lab builds their configs silently (the config itself still warns, tests/test_config.py)."""
    import warnings

    exp = load_experiment("experts_k")
    cfg_moe = exp.run_config("e8_k1", decisive=True).model.moe
    assert cfg_moe.top_k == 1 and cfg_moe.router.normalize
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exp.run_config("e32_k1", decisive=True)


def test_verdict_rules_on_synthetic_numbers():
    """Key checks decide: all hold -> reproduced; some hold -> partial; one fails and none
    holds -> not_reproduced; none decided -> inconclusive; a missing number is undecided;
    sanity checks are shown but never counted."""
    checks = [
        Check("aux.maxvio_global", "<", "none.maxvio_global", factor=0.5),
        Check("none.val_loss", ">", "lf.val_loss"),
        Check("none.val_loss", ">", 0.0, kind="sanity"),
    ]

    def nums(aux_mv, none_loss):
        return {
            "aux": {"maxvio_global": {"mean": aux_mv, "values": [aux_mv - 0.1, aux_mv + 0.1]}},
            "none": {
                "maxvio_global": {"mean": 4.0, "values": [3.9, 4.1]},
                "val_loss": {"mean": none_loss, "values": [none_loss - 0.01, none_loss + 0.01]},
            },
            "lf": {"val_loss": {"mean": 5.0, "values": [4.99, 5.01]}},
        }

    assert decide(checks, nums(0.3, 5.1))[0] == "reproduced"
    assert decide(checks, nums(3.0, 5.1))[0] == "partial"
    assert decide(checks, nums(3.0, 4.9))[0] == "not_reproduced"
    assert decide(checks, nums(2.0, 5.0))[0] == "inconclusive"  # both within 2 SE
    assert decide(checks, nums(0.3, 5.1), too_short="--quick")[0] == "inconclusive"
    verdict, rows = decide(checks, {"aux": {}})
    assert verdict == "inconclusive" and rows[0]["undecided"]
    one_seed = {"a": {"x": {"mean": 1.2, "values": [1.2]}}}
    row = Check("a.x", ">", 1.0).evaluate(one_seed)
    assert row["outcome"] == "inconclusive", "one seed never decides a key check"
    assert Check("a.x", ">", 1.0, kind="sanity").evaluate(one_seed)["outcome"] == "holds"


def test_an_exact_tie_with_no_spread_decides_nothing():
    """No dead expert in any seed of either arm: `<` would fail and `<=` hold by the 2-SE rule
    (SE 0); both are inconclusive, as a tie on a base rate of zero says nothing. A difference
    with no spread still decides."""
    zeros = {v: {"dead_val": {"mean": 0, "values": [0, 0, 0]}} for v in ("a", "b")}
    for op in ("<", "<="):
        row = Check("a.dead_val", op, "b.dead_val").evaluate(zeros)
        assert row["outcome"] == "inconclusive" and "exact tie" in row["note"]
    assert row["raw_outcome"] == "holds"
    apart = dict(zeros, b={"dead_val": {"mean": 2, "values": [2, 2, 2]}})
    assert Check("a.dead_val", "<", "b.dead_val").evaluate(apart)["outcome"] == "holds"


def test_check_row_carries_the_noise_model():
    """A decided check reports delta, se, ci95, mde and flip rate; a paper effect below the
    MDE makes it 'beyond resolution' (inconclusive, the 2-SE answer kept as raw_outcome)."""
    numbers = {
        "a": {"val_loss": {"mean": 5.0, "values": [4.9, 5.0, 5.1]}},
        "b": {"val_loss": {"mean": 5.5, "values": [5.4, 5.5, 5.6]}},
    }
    row = Check("a.val_loss", "<", "b.val_loss").evaluate(numbers)
    assert row["outcome"] == "holds" and row["delta"] == pytest.approx(-0.5)
    assert row["se"] == pytest.approx((0.01 / 3 + 0.01 / 3) ** 0.5)
    lo, hi = row["ci95"]
    assert lo < -0.5 < hi < 0 and row["mde"] == pytest.approx(2.8416 * row["se"], rel=1e-3)
    assert row["flip_rate"] is not None and 0 <= row["flip_rate"] <= 1
    tiny = Check("a.val_loss", "<", "b.val_loss", paper=-0.006).evaluate(numbers)
    assert tiny["outcome"] == "inconclusive" and tiny["raw_outcome"] == "holds"
    assert tiny["note"].startswith("beyond resolution")
    wrong_way = Check("b.val_loss", "<", "a.val_loss", paper=-0.006).evaluate(numbers)
    assert wrong_way["outcome"] == "fails"  # violated by >= 2 SE: a finding, not "beyond"


def test_checks_parse_kind_and_paper_fields(tmp_path):
    """Experiment files may declare kind, paper, paired and revised on a check; an unknown
    kind is refused naming the field."""
    base = (EXPERIMENTS / "collapse.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(base + '\n[[checks]]\nlhs = "none.val_loss"\nop = "<"\nrhs = 9\nkind = "x"\n')
    with pytest.raises(ValueError, match="kind"):
        load_experiment(bad)


def test_lab_run_quick_end_to_end(tmp_path, monkeypatch, capsys):
    """`lab run collapse --quick` through the CLI function writes result.json + PNGs."""
    from moelab.lab import runner

    monkeypatch.setattr(runner, "CACHE", tmp_path / "cache")
    exp = load_experiment("collapse")
    # CI-sized even for a test: 3 steps, 1 layer, tiny batches.
    shrink = ["train.steps=3", "model.n_layers=1", "train.batch_size=4", "data.seq_len=32",
              "train.eval_max_tokens=512", "train.log_every=1", "train.warmup_steps=1"]  # fmt: skip
    exp = dataclasses.replace(exp, quick=shrink, quick_variants=["none", "aux"])
    out = tmp_path / "collapse"
    args = _parse(["lab", "run", "collapse", "--quick", "--out", str(out)])
    monkeypatch.setattr("moelab.lab.load_experiment", lambda name: exp)
    assert args.func(args) == 0
    res = json.loads((out / "result.json").read_text())
    assert REQUIRED <= set(res)
    assert res["verdict"] in VERDICTS
    assert res["tokens_per_expert_per_step"] == 4 * 32 * 2 / 16
    assert (out / "curves.png").exists()
    assert res["stale_runs"] == [] and res["verdict"] == "inconclusive"  # --quick: too short
    assert all(c["outcome"] == "inconclusive" for c in res["checks"] if c["kind"] == "key")
    # the same runs seen by code that computes other numbers: never used for a verdict
    from moelab.lab import fingerprint

    other = dict(fingerprint.current(), digest="other")
    monkeypatch.setattr(fingerprint, "current", lambda: other)
    args = _parse(["lab", "run", "collapse", "--quick", "--out", str(out), "--cached-only"])
    with pytest.raises(ValueError, match="no run trained or cached"):
        args.func(args)  # nothing valid is cached: result.json is left as it was
    # without --cached-only they are retrained, the old folders kept aside
    args = _parse(["lab", "run", "collapse", "--quick", "--out", str(out)])
    assert args.func(args) == 0
    assert "other numerics fingerprint" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.stale-*"))) == 2
    res = json.loads((out / "result.json").read_text())
    assert res["stale_runs"] == ["none seed 0", "aux seed 0"]
    assert list(res["fingerprint"]) == ["other"]


def test_run_states_tell_done_training_resumable_stale_and_to_train(tmp_path, monkeypatch, capsys):
    """`lab list --runs` reads the cache: a finished run is done, a folder whose lock a live
    process holds is training, a run cut off by a signal is resumable, runs of other numerics
    are stale, the rest are to train; `lab list --runs` prints one summary line each. Lab runs
    checkpoint every LAB_CKPT_EVERY steps, so that a killed one resumes; a finished one keeps
    only its last checkpoint."""
    import os
    import signal
    import socket

    from moelab import checkpoint
    from moelab.lab import describe_states, fingerprint, run_states, runner
    from moelab.signals import Interrupted
    from moelab.train import train

    monkeypatch.setattr(runner, "CACHE", tmp_path / "cache")
    shrink = ["train.steps=3", "model.n_layers=1", "train.batch_size=4", "data.seq_len=32",
              "train.eval_max_tokens=512", "train.log_every=1", "train.warmup_steps=1"]  # fmt: skip
    exp = dataclasses.replace(
        load_experiment("collapse"), quick=shrink, quick_variants=["none", "aux", "loss_free"]
    )
    states = lambda: run_states(exp, quick=True, decisive=False)  # noqa: E731
    assert states() == {v: ["to train"] for v in ("none", "aux", "loss_free")}
    monkeypatch.setattr(runner, "LAB_CKPT_EVERY", 2)  # lab runs checkpoint on their own
    fingerprint.current()  # its golden micro-run saves checkpoints of its own
    saved, save = [], checkpoint.save
    monkeypatch.setattr(
        checkpoint, "save", lambda f, s, step, **kw: saved.append(step) or save(f, s, step, **kw)
    )
    done = runner.train_cached(exp.run_config("none", quick=True, seed=0))
    assert saved == [2, 3]
    assert [p.name for p in done.glob("ckpt-*.pt")] == ["ckpt-000003.pt"]  # finished: one kept
    busy = runner.CACHE / runner.run_key(exp.run_config("aux", quick=True, seed=0), 0)
    busy.mkdir(parents=True)
    (busy / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    cut = runner.CACHE / runner.run_key(exp.run_config("loss_free", quick=True, seed=0), 0)
    cut.mkdir()
    fingerprint.write(cut, fingerprint.current())
    stop = lambda step, model: step == 2 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    with pytest.raises(Interrupted):
        train(exp.run_config("loss_free", quick=True, seed=0), cut, progress=False, on_step=stop)
    assert states() == {"none": ["done"], "aux": ["training"], "loss_free": ["resumable"]}
    line = describe_states(states())
    assert line == "1/3 done, 1 training, 1 resumable; to run: aux (seed 0), loss_free (seed 0)"
    other = dict(fingerprint.current(), digest="other")
    monkeypatch.setattr(fingerprint, "current", lambda: other)
    assert states()["none"] == ["stale"]
    args = _parse(["lab", "list", "--runs"])  # the suite's own files: nothing cached here
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "decisive runs: 0/9 done; to run: none (seeds 0, 1, 2)" in out


def test_finished_tells_a_whole_run_from_one_segment(tmp_path):
    """The device script returns folders that `finished` accepts: summary.json at the
    config's last step and no partial snapshots (a segment writes a summary too)."""
    from moelab.lab.runner import finished

    def folder(name: str, at: int, partial: bool = False):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"train": {"steps": 1000}}))
        (d / "summary.json").write_text(json.dumps({"steps": at}))
        if partial:
            (d / "snapshots.partial.pt").write_bytes(b"")
        return d

    assert finished(folder("whole", 1000))
    assert not finished(folder("segment", 450, partial=True))
    assert not finished(folder("last_segment_routing", 1000, partial=True))
    assert not finished(tmp_path / "missing")


def test_lookup_handles_dotted_variant_names():
    """Variant names may contain dots (`cf1.0_score`); the metric path still resolves."""
    from moelab.lab.spec import lookup

    nums = {"cf1.0_score": {"drop_rate": {"mean": 0.4}}, "analysis": {"a": {"fall": 0.9}}}
    assert lookup(nums, "cf1.0_score.drop_rate") == 0.4
    assert lookup(nums, "analysis.a.fall") == 0.9
    assert lookup(nums, "cf1.0_score.missing") is None


def test_sampling_floor_falls_as_one_over_sqrt_n():
    """A balanced random router's MaxVio over n tokens falls ≈ 4× per 16× more tokens."""
    from moelab.lab.analysis import sampling_maxvio

    ratio = sampling_maxvio(4096, 16, 2) / sampling_maxvio(256, 16, 2)
    assert 0.2 < ratio < 0.3


def test_count_spikes():
    """Spikes: losses above 1.2 × the running minimum after the first rows; NaN counts."""
    from moelab.lab.runner import count_spikes

    assert count_spikes([8, 7, 6, 5, 4, 3]) == 0
    assert count_spikes([8, 7, 6, 5, 7, 4, float("nan")]) == 2


def test_chunk_counts_match_a_loop():
    """Per-chunk counts equal metrics.expert_counts of each chunk (mask respected)."""
    import torch

    from moelab import metrics
    from moelab.lab.analysis import _chunk_counts

    g = torch.Generator().manual_seed(0)
    experts_TK = torch.randint(0, 8, (100, 2), generator=g)
    mask_TK = torch.rand(100, 2, generator=g) > 0.3
    got_NE = _chunk_counts(experts_TK, mask_TK, 8, 16)
    for i in range(6):
        sl = slice(16 * i, 16 * (i + 1))
        want = metrics.expert_counts(experts_TK[sl], 8, mask=mask_TK[sl])
        assert torch.equal(got_NE[i], want)


def test_pretrain_is_seed_major_and_threads_reach_every_run(monkeypatch):
    """`lab run A B --pretrain-only --threads 1`: every variant's seed 0 is queued before any
    seed 1 (an interrupted pretrain still covers every variant), and each run has threads=1."""
    from moelab.lab import runner

    calls = []
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _InlinePool)
    monkeypatch.setattr(runner, "train_cached", lambda cfg, **k: calls.append(cfg))
    args = _parse(["lab", "run", "stability", "collapse", "--pretrain-only", "--threads", "1"])
    assert args.func(args) == 0
    seeds = [c.train.seed for c in calls]
    assert seeds == sorted(seeds) and seeds[0] == 0 and max(seeds) == 2
    assert {c.train.threads for c in calls} == {1}
    n_first = len(load_experiment("stability").variants) + len(load_experiment("collapse").variants)
    assert seeds.count(0) == n_first


def test_cached_only_trains_nothing_even_with_jobs(monkeypatch, tmp_path):
    """`lab run NAME --cached-only --jobs 2` analyses the cache only: no pretrain pool, no
    training run (it once resumed and trained missing runs); with --pretrain-only it is refused."""
    from moelab.lab import runner

    monkeypatch.setattr(runner, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _InlinePool)
    trained = []
    monkeypatch.setattr(runner, "train_cached", lambda *a, **k: trained.append(a))
    args = _parse(["lab", "run", "collapse", "--quick", "--cached-only", "--jobs", "2",
                   "--out", str(tmp_path / "out")])  # fmt: skip
    with pytest.raises(ValueError, match="no run trained or cached"):
        args.func(args)
    assert trained == []
    args = _parse(["lab", "run", "collapse", "--cached-only", "--pretrain-only"])
    with pytest.raises(ValueError, match="--cached-only and --pretrain-only exclude each other"):
        args.func(args)


class _InlinePool:
    """ProcessPoolExecutor stand-in that runs each job at submit time, in order."""

    def __init__(self, workers, **kw):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args, **kw):
        fut = concurrent.futures.Future()
        fut.set_result(fn(*args, **kw))
        return fut


def test_nproc_table_and_the_computation_batch_of_a_torchrun_variant(tmp_path):
    """`[nproc]` sets torchrun processes per variant (validated); with per-rank batches the
    setup counts W ranks in the batch and tokens per expert; a bad entry names the table."""
    from moelab.lab import _setup, runner

    exp = load_experiment("computation_batch")
    assert exp.nproc("lf_w4") == 4 and exp.nproc("aux") == 1
    s1 = _setup(exp.run_config("lf_w1"), 1)
    s4 = _setup(exp.run_config("lf_w4"), exp.nproc("lf_w4"))
    assert s4["micro_batch_tokens"] == 4 * s1["micro_batch_tokens"] == 4 * 4 * 128
    assert s4["tokens_per_expert_per_step"] == 4 * s1["tokens_per_expert_per_step"]
    glob = exp.run_config("aux")  # global batch of 16 sequences of 128 tokens
    assert runner.computation_batch_tokens(glob, 4) == (16 // 4) * 128 * 4
    bad = tmp_path / "bad.toml"
    bad.write_text('title = "t"\nclaim = "c"\nbase = "tiny"\nanalysis = "balance"\n'
                   'number = "0"\n[variants]\na = []\n[nproc]\na = 0\n')  # fmt: skip
    with pytest.raises(ValueError, match="missing.*paper"):
        load_experiment(bad)
    bad.write_text(bad.read_text() + "[paper]\nsource = 's'\n")
    with pytest.raises(ValueError, match=r"\[nproc\]"):
        load_experiment(bad)


def _fake_run(folder, cfg, world_size: int, maxvio: list[float]):
    """A finished run's folder: config.json, summary.json and a training log (tests only)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    (folder / "summary.json").write_text(json.dumps({"seconds": 1.0, "steps": len(maxvio)}))
    rows = [{"world_size": world_size}]
    rows += [{"step": i, "loss": 5.0, "maxvio_batch": v} for i, v in enumerate(maxvio)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_rank_scaling_reads_maxvio_tails_against_the_computation_batch(tmp_path):
    """rank_scaling: per group, the mean over seeds of each run's last-quarter MaxVio_batch
    against micro-batch tokens × the logged world size, fall = last / first per seed (kept as
    fall_values: the check's noise model), then averaged, and the sampling reference on the
    same sizes."""
    from moelab.lab.analysis import rank_scaling
    from moelab.runs import sampling_maxvio

    exp = load_experiment("computation_batch")
    tails = {"lf_w1": [2.0, 4.0], "lf_w2": [1.0, 1.0], "aux_w1": [3.0, 3.0], "aux_w2": [2.4, 2.4]}
    runs = {}
    for name, per_seed in tails.items():
        W = exp.nproc(name)
        runs[name] = [  # 8 steps: the tail is the last 2; the first 6 must not count
            _fake_run(tmp_path / f"{name}-{s}", exp.run_config(name), W, [9.0] * 6 + [v, v])
            for s, v in enumerate(per_seed)
        ]
    res = rank_scaling(runs, {"lf": ["lf_w1", "lf_w2", "lf_w4"], "aux": ["aux_w1", "aux_w2"]},
                       16, 2)  # fmt: skip
    assert res["lf"]["variants"] == ["lf_w1", "lf_w2"]  # lf_w4 never ran: left out
    assert res["lf"]["curve"] == [3.0, 1.0] and res["lf"]["curve_std"] == [1.0, 0.0]
    assert res["lf"]["fall_values"] == [0.5, 0.25] and res["lf"]["fall"] == pytest.approx(0.375)
    assert res["aux"]["fall_values"] == pytest.approx([0.8, 0.8])
    from moelab.lab.spec import lookup_values

    assert lookup_values({"analysis": {"ranks": res}}, "analysis.ranks.lf.fall") == [0.5, 0.25]
    assert res["sizes"] == res["lf"]["sizes"] == [4 * 128, 2 * 4 * 128]
    assert res["reference"] == [sampling_maxvio(n, 16, 2) for n in res["sizes"]]


def test_chunk_analysis_averages_over_seeds(monkeypatch):
    """`chunks`: the curve is the mean over seeds of each seed's chunk curve, the spread their
    standard deviation, `fall` the mean over seeds of MaxVio at the largest chunk / at a 16x
    smaller one (per-seed values kept), and the
    reference is the sampling floor at the same chunk sizes."""
    import types

    import numpy as np
    import torch

    from moelab.lab import analysis

    E, K, T = 8, 2, 4096
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(moe=types.SimpleNamespace(
        num_experts=E, top_k=K)))  # fmt: skip
    uniform = torch.arange(T * K).reshape(T, K) % E  # perfectly balanced: MaxVio 0
    skewed = torch.randint(0, E, (T, K), generator=torch.Generator().manual_seed(1))
    skewed[: T // 2] = 0  # first half all to expert 0
    layers = {"s0": [(uniform, None)], "s1": [(skewed, None), (uniform, None)]}
    routed = {d: (types.SimpleNamespace(cfg=cfg), torch.zeros(T), ls) for d, ls in layers.items()}
    monkeypatch.setattr(analysis, "_routed", lambda d, max_tokens: routed[d])
    exp = types.SimpleNamespace(options={"chunk_max": 1 << 20})
    res, figs = analysis.chunks(exp, {"v": ["s0", "s1"]})
    sizes = [2**p for p in range(6, 11)]  # up to T // 4: at least 4 chunks of the largest
    want = np.array([analysis.chunk_curve(layers[d], E, sizes) for d in ("s0", "s1")])
    assert res["sizes"] == sizes and "chunks" in figs
    np.testing.assert_allclose(res["v"]["curve"], want.mean(0))
    np.testing.assert_allclose(res["v"]["curve_std"], want.std(0))
    assert want[0].max() == 0 and want[1].min() > 0  # the two seeds differ, so the mean matters
    falls = want[:, -1] / np.maximum(want[:, -5], 1e-9)  # per seed, then averaged
    assert res["v"]["fall"] == pytest.approx(falls.mean())
    assert res["v"]["fall_values"] == pytest.approx(falls.tolist())
    assert res["v"]["seeds"] == 2
    assert res["reference"] == [analysis.sampling_maxvio(n, E, K) for n in sizes]


def test_decisive_runs_are_shared_through_the_cache():
    """The arms that several experiments name at their decisive size resolve to one config
    (one cached run): noise's *_1000 arms are experiment 3's, as are collapse's and 3b's bs16."""
    from moelab.lab import runner

    def key(name, variant, decisive=True):
        exp = load_experiment(name)
        exp = dataclasses.replace(exp, common=[*exp.common, "train.threads=1"])
        return runner.run_key(exp.run_config(variant, seed=2, decisive=decisive), 0)

    pairs = [
        (("noise", "none_1000", False), ("loss_free_vs_aux", "alpha_0", True)),
        (("noise", "aux_1000", False), ("loss_free_vs_aux", "alpha_1e-2", True)),
        (("noise", "loss_free_1000", False), ("loss_free_vs_aux", "loss_free", True)),
        (("collapse", "loss_free", True), ("loss_free_vs_aux", "loss_free", True)),
        (("computation_batch", "aux", True), ("loss_free_vs_aux", "alpha_1e-2", True)),
        (("bias_rate_batch", "u_1e-3_bs16", True), ("loss_free_vs_aux", "loss_free", True)),
        (("bias_rate_batch", "u_1e-2_bs16", True), ("loss_free_vs_aux", "u_1e-2", True)),
    ]
    for a, b in pairs:
        assert key(*a) == key(*b), (a, b)


def test_decisive_size_and_per_variant_overrides():
    """--decisive adds the [decisive] overrides and the per-variant ones (3b's equal token
    budget); a shorter run is reported too short, --quick and --decisive exclude each other."""
    from moelab.lab import _setup as setup_of
    from moelab.lab import size_shortfall

    exp = load_experiment("bias_rate_batch")
    tokens = set()
    for v in exp.variants:
        cfg = exp.run_config(v, decisive=True)
        tokens.add(cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len)
    assert tokens == {2_048_000}
    short = {v: setup_of(exp.run_config(v)) for v in exp.variants}
    assert "decisive" in size_shortfall(exp, short, quick=False)
    full = {v: setup_of(exp.run_config(v, decisive=True)) for v in exp.variants}
    assert size_shortfall(exp, full, quick=False) == ""
    with pytest.raises(ValueError, match="exclude"):
        exp.run_config("u_1e-3_bs4", quick=True, decisive=True)


def test_contrast_values_are_per_seed_weighted_sums():
    """An interaction (a − b) − (c − d) per seed; missing arms or unequal seeds give None."""
    from moelab.lab.spec import contrast_values

    t = {v: {"m": {"values": vals}} for v, vals in
         {"a": [5.0, 6.0], "b": [1.0, 1.0], "c": [2.0, 2.0], "d": [1.0, 2.0]}.items()}  # fmt: skip
    w = {"a.m": 1, "b.m": -1, "c.m": -1, "d.m": 1}
    assert contrast_values(t, w) == [3.0, 5.0]
    assert contrast_values(t, {"a.m": 1, "zz.m": -1}) is None
    t["d"]["m"]["values"] = [1.0]
    assert contrast_values(t, w) is None


def test_scope_holdout_gap_compares_the_same_domain_held_out_and_trained(tmp_path):
    """`scope`: holdout_gap per seed = MaxVio of a domain's routing when held out − the same
    domain's MaxVio in the reference arm trained on every domain; seen_maxvio_global pools the
    training domains only."""
    import types

    from moelab.lab import analysis

    def run(name, holdout, freq_DE):
        d = tmp_path / name
        d.mkdir()
        row = {"val_loss/a": 1.0, "val_loss/b": 1.0, "domain_freq_layers": [freq_DE]}
        (d / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        (d / "config.json").write_text(json.dumps({"data": {"holdout_domains": holdout}}))
        return d

    even, skew = [0.5, 0.5], [0.9, 0.1]  # MaxVio 0 and 0.8
    ref = run("ref", [], [even, even])
    hold_b = run("hold_b", ["b"], [even, skew])
    exp = types.SimpleNamespace(options={"holdout_reference": "ref"})
    res, _ = analysis.scope(exp, {"ref": [ref], "hold_b": [hold_b]})
    assert res["holdout_gap_values"] == pytest.approx([0.8])
    assert res["hold_b"]["holdout_maxvio"] == pytest.approx(0.8)
    assert res["hold_b"]["seen_maxvio_global"] == pytest.approx(0.0)
    assert res["ref"]["by_domain"] == {"a": 0.0, "b": 0.0}


def test_lab_run_refuses_bad_sizes_and_never_overwrites_with_nothing(tmp_path, monkeypatch):
    """--seeds < 1 and --quick with --decisive are one-line errors; --cached-only with an empty
    cache trains nothing and leaves an existing result.json untouched."""
    from moelab.lab import runner

    for argv, msg in [(["--seeds", "0"], "seeds"), (["--quick", "--decisive"], "exclude")]:
        args = _parse(["lab", "run", "collapse", *argv])
        with pytest.raises(ValueError, match=msg):
            args.func(args)
    monkeypatch.setattr(runner, "CACHE", tmp_path / "empty")
    out = tmp_path / "res"
    out.mkdir()
    (out / "result.json").write_text("{}")
    args = _parse(["lab", "run", "collapse", "--quick", "--cached-only", "--out", str(out)])
    with pytest.raises(ValueError, match="left as it was"):
        args.func(args)
    assert (out / "result.json").read_text() == "{}"


def test_leakage_reports_synthetic_nats_per_char_against_the_bound(tmp_path):
    """With the synthetic domain in the data, the leakage analysis gives each seed's chunked
    loss on it in nats per character beside the entropy bound; a token-choice model, causal,
    stays above the bound."""
    import types
    from pathlib import Path

    from moelab.lab import analysis
    from moelab.runconfig import load_run_config
    from moelab.train import train

    micro = Path(__file__).parent / "fixtures" / "micro.toml"
    sets = ["train.steps=3", "train.eval_every=0", "train.log_every=1",
            "data.domains=[\"literary_kjv\", \"synthetic_uniform\"]"]  # fmt: skip
    train(load_run_config(str(micro), sets), tmp_path / "tc", progress=False)
    exp = types.SimpleNamespace(options={"eval_chunk": 32, "eval_seqs": 8})
    res, _ = analysis.leakage(exp, {"token_choice": [tmp_path / "tc"]})
    tc = res["token_choice"]
    assert len(tc["synthetic_nats_per_char_values"]) == 1
    assert tc["synthetic_nats_per_char"] > res["synthetic_bound"] > 3.4


def test_run_key_ignores_defaults_and_a_hit_checks_the_config(tmp_path):
    """The cache key hashes only non-default fields (so a field added with a default keeps
    every key), and a cached folder counts only if its config.json is the requested config."""
    from moelab.lab import runner
    from moelab.runconfig import build_config, load_config_dict

    base = load_config_dict("tiny")
    cfg = build_config(base, ["train.steps=5"])
    assert runner.run_key(cfg, 0) == runner.run_key(
        build_config(base, ["train.steps=5", "model.moe.router.dtype='fp32'"]), 0
    )
    assert runner.run_key(cfg, 0) != runner.run_key(build_config(base, ["train.steps=6"]), 0)
    out = tmp_path / runner.run_key(cfg, 0)
    out.mkdir()
    from moelab.config import to_dict

    (out / "config.json").write_text(json.dumps(to_dict(cfg)))
    assert runner.same_config(out, cfg)
    other = to_dict(cfg)
    other["train"]["lr"] = 1.0  # e.g. a default that changed since the run was trained
    (out / "config.json").write_text(json.dumps(other))
    assert not runner.same_config(out, cfg)


@pytest.mark.slow
def test_sigterm_stops_a_parallel_lab_run_and_its_workers(tmp_path):
    """SIGTERM to `lab run --jobs 2`: no worker starts another run, the running ones stop
    after their step; the lab exits 143 within seconds with one line, no worker left."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    micro = Path(__file__).parent / "fixtures" / "micro.toml"
    exp = tmp_path / "sig.toml"
    exp.write_text(
        f'number = "99"\ntitle = "t"\nclaim = "c"\nbase = "{micro}"\nanalysis = "balance"\n'
        'common = ["train.steps=100000", "train.eval_every=0", "train.threads=1"]\n'
        "[paper]\nx = 1\n[variants]\na = []\nb = ['model.moe.balance.aux_coef=0.01']\n"
        "c = ['model.moe.balance.aux_coef=0.02']\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "moelab", "lab", "run", str(exp), "--jobs", "2", "--pretrain-only"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    cache = tmp_path / "runs" / "lab" / "cache"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(cache.glob("*/metrics.jsonl"))) < 2:
        time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert time.monotonic() - t0 < 30
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "stopped by SIGTERM; finished runs stay cached" in lines[0], err
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", str(exp)], capture_output=True, text=True).stdout
    assert not left.strip(), f"workers still running: {left}"  # zombies have no cmdline
    assert len(list(cache.iterdir())) == 2  # the third run never started


@pytest.mark.parametrize("snapshots", [0, 3])
def test_a_lab_run_cut_off_by_a_signal_resumes_to_the_uninterrupted_numbers(
    tmp_path, monkeypatch, capsys, snapshots
):
    """A cached run stopped by SIGTERM (a session's end) continues from its checkpoint on the
    next `lab run` instead of restarting, and ends with the numbers (and routing snapshots) of
    one uninterrupted run; a run started by code with another fingerprint is not resumed."""
    import os
    import signal

    import torch

    from moelab.lab import runner
    from moelab.runconfig import build_config, load_config_dict
    from moelab.signals import Interrupted

    shrink = ["train.steps=6", "model.n_layers=1", "train.batch_size=4", "data.seq_len=32",
              "train.eval_max_tokens=512", "train.log_every=1", "train.warmup_steps=1",
              "train.threads=1", "train.tensorboard=false", "train.eval_every=0"]  # fmt: skip
    cfg = build_config(load_config_dict("tiny"), shrink)
    whole = runner.train_cached(cfg, snapshots=snapshots, cache=tmp_path / "whole")
    real = runner.train

    def cut_at_3(*args, **kw):
        def hook(step, model):
            if step == 3:  # inside the second of three segments
                os.kill(os.getpid(), signal.SIGTERM)

        return real(*args, **kw, on_step=hook)

    monkeypatch.setattr(runner, "train", cut_at_3)
    with pytest.raises(Interrupted):
        runner.train_cached(cfg, snapshots=snapshots, cache=tmp_path / "cut")
    monkeypatch.setattr(runner, "train", real)
    out = runner.train_cached(cfg, snapshots=snapshots, cache=tmp_path / "cut")
    assert "resuming it" in capsys.readouterr().out
    assert not list((tmp_path / "cut").glob("*.stale-*"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    key = ("step", "loss", "aux_loss")
    assert [[r.get(k) for k in key] for r in rows] == [[r.get(k) for k in key] for r in want]
    if snapshots:
        a, b = torch.load(out / "snapshots.pt"), torch.load(whole / "snapshots.pt")
        assert a["steps"] == b["steps"] == [2, 4, 6]
        pairs = zip(a["experts"], b["experts"], strict=True)
        assert all(torch.equal(x, y) for s, t in pairs for x, y in zip(s, t, strict=True))
        assert not (out / "snapshots.partial.pt").exists()
    # a cut-off run whose fingerprint differs from today's is moved aside and retrained
    monkeypatch.setattr(runner, "train", cut_at_3)
    with pytest.raises(Interrupted):
        runner.train_cached(cfg, snapshots=snapshots, cache=tmp_path / "other")
    monkeypatch.setattr(runner, "train", real)
    from moelab.lab import fingerprint

    monkeypatch.setattr(fingerprint, "current", lambda: dict(fingerprint.read(out), digest="x"))
    runner.train_cached(cfg, snapshots=snapshots, cache=tmp_path / "other")
    assert len(list((tmp_path / "other").glob("*.stale-*"))) == 1


def test_a_run_another_process_trains_is_left_to_it(tmp_path):
    """Two lab lanes may share a variant: a cache folder whose lock a live process holds is
    neither resumed nor moved aside as stale; train_cached raises TrainingElsewhere (the pool
    prints "skipped") and the folder stays as it was."""
    from moelab import runfolder
    from moelab.lab import runner
    from moelab.runconfig import build_config, load_config_dict

    cfg = build_config(load_config_dict("tiny"), ["train.steps=2", "model.n_layers=1"])
    out = tmp_path / runner.run_key(cfg, 0)
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # started, no checkpoint yet
    held = runfolder.acquire(out)  # this test process is the other, live trainer
    try:
        with pytest.raises(runner.TrainingElsewhere, match="being trained by another process"):
            runner.train_cached(cfg, cache=tmp_path)
        assert runner.run_state(cfg, 0, tmp_path) == "training"
    finally:
        runfolder.release(held)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


@pytest.mark.slow
def test_a_torchrun_lab_run_stopped_in_a_worker_resumes_to_the_uninterrupted_numbers(
    tmp_path, monkeypatch, capsys
):
    """A torchrun variant (EP=2, per-rank batches) checkpoints like any lab run: a stop that a
    pool worker deferred is forwarded to torchrun, the ranks save and stop, and the next
    `lab run` resumes the run in the same layout to the numbers of an uninterrupted one."""
    import signal

    from moelab import checkpoint, signals
    from moelab.lab import runner
    from moelab.runconfig import build_config, load_config_dict

    shrink = ["train.steps=300", "model.n_layers=1", "train.batch_size=2", "data.seq_len=32",
              "train.eval_max_tokens=512", "train.log_every=1", "train.warmup_steps=1",
              "train.threads=1", "train.tensorboard=false", "train.eval_every=0",
              "parallel.ep=2", "parallel.batch='per_rank'",
              "model.moe.balance.bias_rate=0.001"]  # fmt: skip
    cfg = build_config(load_config_dict("tiny"), shrink)
    whole = runner.train_cached(cfg, cache=tmp_path / "whole", nproc=2)
    cut = tmp_path / "cut" / runner.run_key(cfg, 0, 2)

    def pending():  # the worker's deferred SIGTERM, once the ranks are training
        rows = cut / "metrics.jsonl"
        started = rows.exists() and len(rows.read_text().splitlines()) >= 3
        return signal.SIGTERM if started else None

    monkeypatch.setattr(signals, "stop_pending", pending)
    with pytest.raises(RuntimeError, match="was stopped"):
        runner.train_cached(cfg, cache=tmp_path / "cut", nproc=2)
    monkeypatch.undo()
    assert 3 <= checkpoint.latest(cut)["step"] < 300
    assert runner.run_state(cfg, 0, tmp_path / "cut", 2) == "resumable"
    out = runner.train_cached(cfg, cache=tmp_path / "cut", nproc=2)
    assert "resuming it" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    key = ("step", "loss", "aux_loss")
    assert [[r.get(k) for k in key] for r in rows] == [[r.get(k) for k in key] for r in want]


def test_a_stop_during_the_analysis_leaves_result_json_as_it_was(tmp_path, monkeypatch):
    """A LabStopped raised inside the analysis (SIGTERM while analysing) propagates: it used to
    be caught as an analysis error and an empty "inconclusive" result.json replaced the
    committed one. An ordinary analysis error is kept in result.json after training, and
    raised with --cached-only (e.g. runs looked up with another --threads: an IndexError once
    replaced experiment 4's result)."""
    import signal

    import moelab.lab as lab
    from moelab.lab import analysis, runner
    from moelab.lab.spec import load_experiment

    exp = dataclasses.replace(load_experiment("collapse"), analysis="scope")
    out = tmp_path / "collapse"
    out.mkdir()
    (out / "result.json").write_text('{"verdict": "partial"}')
    runs = {"v": [tmp_path / "run"]}
    table = {"v": {}}
    monkeypatch.setattr(lab, "_train_variants", lambda *a, **k: (runs, table, {}, []))
    keys = ("step", "loss", "maxvio_batch", "dead", "drop_rate")
    monkeypatch.setattr(runner, "curves", lambda d: {k: [] for k in keys})

    def stopped(exp, runs):
        raise lab.LabStopped(signal.SIGTERM)

    monkeypatch.setitem(analysis.KINDS, "scope", stopped)
    with pytest.raises(lab.LabStopped):
        lab.run_experiment(exp, out, cached_only=True)
    assert json.loads((out / "result.json").read_text()) == {"verdict": "partial"}

    def broken(exp, runs):
        raise ValueError("no routed tokens")

    monkeypatch.setitem(analysis.KINDS, "scope", broken)
    extra, _ = lab._analyse(exp, runs, table)  # after training: the error goes in result.json
    assert extra == {"error": "ValueError('no routed tokens')"}
    with pytest.raises(ValueError, match="analysis failed: no routed tokens; result.json left"):
        lab.run_experiment(exp, out, cached_only=True)  # nothing trained: the old one stays
    assert json.loads((out / "result.json").read_text()) == {"verdict": "partial"}


def test_a_run_record_restores_a_finished_run_without_its_checkpoint(tmp_path, monkeypatch):
    """keep_record copies a finished run's config, summary, fingerprint, code hash and gzipped
    log (no checkpoint) to RECORDS; a cache without the run restores it from there, with the
    same numbers, as done for an analysis of the log and as to train for one that loads the
    model (needs_weights), which retrains it. Unfinished runs are not recorded."""
    from moelab.lab import analysis, run_states, runner

    monkeypatch.setattr(runner, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(runner, "RECORDS", tmp_path / "records")
    shrink = ["train.steps=3", "model.n_layers=1", "train.batch_size=4", "data.seq_len=32",
              "train.eval_max_tokens=512", "train.log_every=1", "train.warmup_steps=1"]  # fmt: skip
    exp = dataclasses.replace(load_experiment("collapse"), quick=shrink, quick_variants=["none"])
    cfg = exp.run_config("none", quick=True, seed=0)
    out = runner.train_cached(cfg)
    assert runner.keep_record(out.parent / "absent") is None
    rec = runner.keep_record(out)
    assert sorted(p.name for p in rec.iterdir()) == sorted(
        [*runner.RECORD_FILES, "metrics.jsonl.gz"]
    )
    assert runner.keep_record(out) == rec  # idempotent
    want = runner.collect(out)
    monkeypatch.setattr(runner, "CACHE", tmp_path / "clean-clone")
    assert runner.is_cached(cfg) and not runner.has_weights(runner.run_folder(cfg))
    assert runner.collect(runner.train_cached(cfg)) == want  # restored, not retrained
    assert run_states(exp, quick=True, decisive=False) == {"none": ["done"]}
    assert not runner.is_cached(cfg, weights=True)
    leak = dataclasses.replace(exp, analysis="leakage")
    assert analysis.needs_weights(leak) and not analysis.needs_weights(exp)
    assert run_states(leak, quick=True, decisive=False) == {"none": ["to train"]}
    again = runner.train_cached(cfg, weights=True)  # retrained: the model is needed
    timing = ("seconds_per_step",)  # the retrained run's numbers are the same, not its speed
    same = lambda a, b: (
        {k: v for k, v in a.items() if k not in timing}
        == {  # noqa: E731
            k: v for k, v in b.items() if k not in timing
        }
    )
    assert runner.has_weights(again) and same(runner.collect(again), want)
    assert len(list(runner.CACHE.glob("*.stale-*"))) == 1  # the record-only folder, kept aside
    unfinished = tmp_path / "cut"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((out / "config.json").read_text())
    assert runner.keep_record(unfinished) is None


def test_run_records_are_not_ignored_by_git():
    """The records are committed with the results: .gitignore must not cover them (a
    `runs/` pattern once did, so every record would have stayed behind)."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("config.json", "metrics.jsonl.gz"):
        path = f"results/runs/0123456789abcdef/{name}"
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0
        assert not ignored, f"{path} is ignored by .gitignore"
