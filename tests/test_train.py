"""Specification of moelab.train: the one trainer, its config resolution and its logs."""

import json
import math
import os
import re
import signal

import pytest
import torch

from moelab.data import load_corpus
from moelab.logs import read_rows
from moelab.runconfig import load_run_config, preset_names
from moelab.train import build_model, train


def test_short_run_loss_falls_and_logs_are_complete(micro_cfg, tmp_path):
    """A 30-step run on real text lowers the training loss by more than 0.5 nat and the
    validation loss below a uniform guess (ln V) by more than 0.5 nat, and writes
    config.json, metrics.jsonl (training and evaluation rows), a checkpoint and summary.json."""
    summary = train(micro_cfg(), tmp_path, progress=False)
    rows = read_rows(tmp_path / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert train_rows[0]["step"] == 1 and train_rows[-1]["step"] == 30
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    vocab = json.loads((tmp_path / "config.json").read_text())["model"]["vocab_size"]
    assert eval_rows[-1]["val_loss"] < math.log(vocab) - 0.5
    assert [r["step"] for r in eval_rows] == [15, 30]
    for key in ("val_loss", "maxvio_global", "mi", "counts_layers"):
        assert key in eval_rows[-1]
    for key in ("maxvio_batch", "dead_layers", "drop_rate", "z_layers", "expert_grad_norm_layers"):
        assert key in train_rows[-1]
    assert json.loads((tmp_path / "config.json").read_text())["model"]["moe"]["num_experts"] == 4
    assert (tmp_path / "latest.json").exists() and summary["steps"] == 30


def test_global_scope_counts_accumulate_over_micro_batches(micro_cfg):
    """With aux_scope = "global", the counts used by the second micro-batch include the first
    one's (Qiu et al. 2025), and end_step resets the accumulator."""
    cfg = micro_cfg("model.moe.balance.aux_coef=0.01", "model.moe.balance.aux_scope='global'")
    corpus = load_corpus(cfg.data)
    cfg, model = build_model(cfg, corpus)
    layer = model.moe_layers[0]
    tokens = torch.randint(0, 100, (4, 16))
    model(tokens)
    first = layer.step_counts.clone()
    model(tokens)
    assert torch.equal(layer.step_counts, 2 * first)
    assert int(first.sum()) == 4 * 16 * cfg.model.moe.top_k
    model.end_step(10)
    assert int(layer.step_counts.sum()) == 0


def test_bias_updates_only_in_training(micro_cfg):
    """Loss-free bias: evaluation routes tokens but never accumulates counts or moves the bias."""
    from moelab.evaluate import evaluate

    cfg = micro_cfg("model.moe.balance.bias_rate=0.01")
    corpus = load_corpus(cfg.data)
    cfg, model = build_model(cfg, corpus)
    evaluate(model, corpus, batch_size=4, seq_len=cfg.data.seq_len, max_tokens=256)
    model.end_step(10)
    assert all(float(layer.bias.abs().sum()) == 0.0 for layer in model.moe_layers)
    model.train()
    model(torch.randint(0, 100, (2, 16)))
    model.end_step(10)
    assert all(float(layer.bias.abs().sum()) > 0.0 for layer in model.moe_layers)


def test_resume_equals_uninterrupted_run(micro_cfg, tmp_path):
    """N steps + checkpoint + resume + N steps equals 2N uninterrupted steps exactly (CPU fp32):
    every logged loss and the final parameters and bias."""
    cfg = micro_cfg(
        "train.steps=12",
        "train.eval_every=0",
        "train.log_every=1",
        "model.moe.balance.bias_rate=0.01",
        "model.moe.router.noise='jitter'",
    )
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "part", max_steps=6, progress=False)
    train(cfg, tmp_path / "part", resume=True, progress=False)
    full = [r["loss"] for r in read_rows(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    part = [r["loss"] for r in read_rows(tmp_path / "part" / "metrics.jsonl") if "loss" in r]
    assert full == part
    from moelab import checkpoint

    a, b = checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "part")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_presets_all_build():
    """Every shipped preset resolves to a valid config."""
    for name in preset_names():
        load_run_config(name)
    assert {"tiny", "dense-tiny", "small", "seed001", "deepseek-v3"} <= set(preset_names())


def test_dense_twin_has_the_same_active_parameters(micro_cfg):
    """The dense twin's FFN hidden size is top_k·d_expert, so active parameters match."""
    from dataclasses import replace

    from moelab.model import MoELM

    cfg = micro_cfg()
    mcfg = replace(cfg.model, vocab_size=100)
    moe, dense = MoELM(mcfg).count_params(), MoELM(mcfg.dense_twin()).count_params()
    router = mcfg.n_layers * mcfg.moe.num_experts * mcfg.d_model
    assert moe["active"] - router == dense["total"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.moe.top_k=9", "moe.top_k=9 is out of range"),
        ("train.lr=-1", "train.lr"),
        ("model.moe.balance.aux_scpe='global'", "did you mean 'model.moe.balance.aux_scope'"),
        ("data.batch_mode='random'", "data.batch_mode"),
        ("train.train_eval_gap=5", "train.train_eval_gap=5 is not allowed"),
        ("train.lr=inf", "train.lr=inf is out of range; allowed: a finite number"),
        ("model.moe.balance.bias_rate=inf", "balance.bias_rate=inf is out of range"),
        ("model.moe.balance.aux_coef=inf", "balance.aux_coef=inf is out of range"),
        ("train.grad_clip=inf", "train.grad_clip=inf is out of range"),
        ("train.beta1=1.5", "train.beta1=1.5 is out of range"),
        ("train.beta2=-0.1", "train.beta2=-0.1 is out of range"),
        ("parallel.timeout_s=inf", "parallel.timeout_s=inf is out of range"),
    ],
)
def test_bad_config_values_name_the_field(micro_cfg, override, message):
    """Config typos and out-of-range values give a ValueError naming the field."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        micro_cfg(override)


def test_train_eval_gap_shows_soft_warmup_and_leaves_training_alone(micro_cfg, tmp_path):
    """train.train_eval_gap logs inference-mode minus training-mode loss on the step's first
    micro-batch: nonzero while soft warm-up mixes all experts, zero after it (dropless, no
    noise), and the training curve is the one without it (the eval forward changes nothing)."""
    sets = ["model.moe.router.soft_warmup_steps=6", "train.log_every=1", "train.eval_every=0"]
    losses = {}
    for gap in (False, True):
        out = tmp_path / str(gap)
        cfg = micro_cfg(*sets, f"train.train_eval_gap={str(gap).lower()}")
        train(cfg, out, max_steps=10, progress=False)
        rows = [r for r in read_rows(out / "metrics.jsonl") if "loss" in r]
        losses[gap] = [r["loss"] for r in rows]
    gaps = [r["train_eval_gap"] for r in rows]
    assert losses[True] == losses[False]
    assert all(g != 0.0 for g in gaps[:6]) and max(map(abs, gaps[:6])) > 1e-5  # soft in training
    assert gaps[6:] == [0.0] * 4  # steps 7-10: hard top-k both ways, the same computation


def test_maxvio_step_is_the_global_batch_and_maxvio_batch_the_micro_batches(micro_cfg, tmp_path):
    """Under gradient accumulation the row's ``maxvio_step`` is MaxVio of the optimizer step's
    counts summed over its micro-batches (``counts_layers``), averaged over layers; it is at
    most the mean per-micro-batch ``maxvio_batch`` (summing counts can only even them out)."""
    from moelab import metrics

    sets = ["train.steps=3", "train.log_every=1", "train.eval_every=0", "train.micro_batch_size=2"]
    train(micro_cfg(*sets), tmp_path, progress=False)
    for row in [r for r in read_rows(tmp_path / "metrics.jsonl") if "loss" in r]:
        want = [float(metrics.max_violation(torch.tensor(c))) for c in row["counts_layers"]]
        assert row["maxvio_step"] == pytest.approx(sum(want) / len(want), rel=1e-12)
        assert row["maxvio_step"] <= row["maxvio_batch"] + 1e-12


# ----------------------------------------------------------------------------- the run folder

FAST = ("train.eval_every=0", "train.log_every=1")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_new_run_into_a_used_folder_is_refused_and_changes_nothing(micro_cfg, tmp_path):
    """Without resume or overwrite, a run folder holding a run is refused before any work:
    metrics, config and every checkpoint stay byte for byte; with overwrite it is replaced."""
    cfg = micro_cfg(*FAST, "train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=5")
    train(cfg, tmp_path, progress=False)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(micro_cfg(*FAST, "train.steps=2"), tmp_path, progress=False)
    assert _snapshot(tmp_path) == before
    train(micro_cfg(*FAST, "train.steps=2"), tmp_path, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000002.pt"]
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2]


@pytest.mark.parametrize("steps", [0, -1])
def test_max_steps_below_one_is_refused(micro_cfg, tmp_path, steps):
    """max_steps < 1 trains nothing, so it is an error, not an empty run."""
    with pytest.raises(ValueError, match=f"--max-steps {steps} is out of range"):
        train(micro_cfg(*FAST), tmp_path / "run", max_steps=steps, progress=False)
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())


def test_resume_to_a_step_below_the_checkpoint_is_refused(micro_cfg, tmp_path, capsys):
    """Resuming with a stop below the checkpoint's step is refused; at the step it is a no-op
    returning the finished run's summary; either way summary.json and the log stay as they are."""
    cfg = micro_cfg(*FAST, "train.steps=4")
    train(cfg, tmp_path, progress=False)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="stop at step 2 .* checkpoint .* at step 4"):
        train(cfg, tmp_path, resume=True, max_steps=2, progress=False)
    summary = train(cfg, tmp_path, resume=True, progress=False)
    assert "nothing to train" in capsys.readouterr().err
    assert summary == json.loads(before["summary.json"]) and _snapshot(tmp_path) == before


def test_a_torn_last_log_line_is_dropped_on_resume(micro_cfg, tmp_path, capsys):
    """A torn last line of metrics.jsonl (a crash mid-append) is dropped with a note naming the
    file, and the resumed log reads as one run."""
    cfg = micro_cfg(*FAST, "train.steps=4")
    train(cfg, tmp_path, max_steps=2, progress=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    train(cfg, tmp_path, resume=True, progress=False)
    assert f"torn last line of {str(tmp_path / 'metrics.jsonl')!r}" in capsys.readouterr().err
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lr=0.02", "train.lr 0.01 -> 0.02"),
        ("train.batch_size=4", "train.batch_size 8 -> 4"),
        ("data.vocab_size=1024", "data.vocab_size 512 -> 1024"),
        ("data.domains=['literary_kjv']", "data.domains"),
    ],
)
def test_resume_with_another_setting_is_refused_naming_it(micro_cfg, tmp_path, override, named):
    """A resume compares the whole resolved config: data, tokenizer, lr and batch changes are
    refused naming the setting; ``allow_change`` accepts one the user names."""
    train(micro_cfg(*FAST, "train.steps=4"), tmp_path, max_steps=2, progress=False)
    with pytest.raises(ValueError, match=re.escape(named)):
        train(micro_cfg(*FAST, "train.steps=4", override), tmp_path, resume=True, progress=False)
    if override.startswith("train.lr"):
        cfg = micro_cfg(*FAST, "train.steps=4", override)
        train(cfg, tmp_path, resume=True, progress=False, allow_change=("train.lr",))


def test_resume_on_other_text_under_the_same_path_is_refused(micro_cfg, tmp_path):
    """The data digest is part of the checkpoint: the same --data path with other content (the
    same string would map to other token ids) is refused."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    cfg = micro_cfg(*FAST, "train.steps=4", f"data.sources=['{text}']", "data.domains=[]")
    train(cfg, tmp_path / "run", max_steps=2, progress=False)
    text.write_text("pack my box with five dozen liquor jugs! " * 400)
    with pytest.raises(ValueError, match="other data or another tokenizer"):
        train(cfg, tmp_path / "run", resume=True, progress=False)


def test_ckpt_every_given_to_train_checkpoints_without_entering_the_config(micro_cfg, tmp_path):
    """``train(..., ckpt_every=N)`` (the lab's periodic checkpoints) saves every N steps while
    config.json keeps the config's own train.ckpt_every, so a resume accepts it."""
    cfg = micro_cfg(*FAST, "train.steps=5", "train.keep_checkpoints=5")
    train(cfg, tmp_path / "run", progress=False, ckpt_every=2)
    saved = sorted(p.name for p in (tmp_path / "run").glob("ckpt-*.pt"))
    assert saved == ["ckpt-000002.pt", "ckpt-000004.pt", "ckpt-000005.pt"]
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["train"]["ckpt_every"] == cfg.train.ckpt_every == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_the_step_and_resumes_exactly(micro_cfg, tmp_path, signum):
    """SIGINT or SIGTERM during step 3 finishes that step, saves a checkpoint at it (with the
    default ckpt_every=0) and raises Interrupted (exit 130 / 143); resuming ends exactly like
    an uninterrupted run."""
    from moelab import checkpoint
    from moelab.signals import Interrupted

    cfg = micro_cfg(*FAST, "train.steps=6")
    train(cfg, tmp_path / "full", progress=False)

    def send(step, model):
        if step == 3:
            os.kill(os.getpid(), signum)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted, match="after step 3; checkpoint saved") as exc:
        train(cfg, tmp_path / "part", progress=False, on_step=send)
    assert exc.value.exit_code == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    assert checkpoint.latest(tmp_path / "part")["step"] == 3
    assert not (tmp_path / "part" / "summary.json").exists()
    # the handlers the process had are back (default_int_handler, or SIG_IGN where the
    # process was started in the background of a non-interactive shell)
    assert {s: signal.getsignal(s) for s in before} == before
    train(cfg, tmp_path / "part", resume=True, progress=False)
    full, part = (read_rows(tmp_path / p / "metrics.jsonl") for p in ("full", "part"))
    assert [r.get("loss") for r in full] == [r.get("loss") for r in part]


@pytest.mark.parametrize(
    "sets",
    [
        ["model.moe.router.method='top_p'", "model.moe.router.top_p=0.6"],
        [
            "model.moe.router.method='relu'",
            "model.moe.balance.l1_coef=1e-3",
            "model.moe.num_experts=8",
        ],
        ["model.moe.null_experts=4", "model.moe.balance.bias_rate=1e-3"],
        ["model.moe.router.method='threshold'"],
    ],
    ids=["top_p", "relu", "null_experts", "threshold"],
)
def test_variable_experts_routing_trains_and_logs_experts_per_token(micro_cfg, tmp_path, sets):
    """Dynamic top-p, ReMoE and null experts train end to end and log, per layer, the mean
    (real) experts a token and the share of tokens with none (and ReMoE's live λ, grown
    while above k = 2)."""
    cfg = micro_cfg(*sets, "train.steps=4", "train.log_every=1", "train.eval_every=0")
    train(cfg, tmp_path, progress=False)
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in rows)
    per_token = rows[0]["experts_per_token_layers"]
    if "null" in sets[0]:  # real experts a token: fewer than k = 2 once a null one is chosen
        assert len(per_token) == 2 and all(0 <= v < 2 for v in per_token)
        return
    assert len(per_token) == 2 and all(1 <= v <= 8 for v in per_token)
    assert all(0 <= v <= 1 for v in rows[0]["no_expert_layers"])
    if "relu" in sets[0]:  # about E/2 = 4 experts a token at init, above k = 2: λ grows
        assert min(per_token) > 2
        assert rows[-1]["l1_coef_layers"][0] == pytest.approx(1e-3 * 1.2**4, rel=1e-4)


def test_default_outputs_train_end_to_end_and_checkpoint_their_averages(micro_cfg, tmp_path):
    """moe.default_outputs trains (activation checkpointing on: the recompute adds nothing to
    the averages) and each MoE layer's ê is part of the checkpoint."""
    import torch

    cfg = micro_cfg("model.moe.default_outputs=true", "train.activation_checkpointing=true",
                    "train.steps=2", "train.eval_every=0")  # fmt: skip
    train(cfg, tmp_path, progress=False)
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    state = torch.load(next(tmp_path.glob("ckpt-*.pt")), weights_only=False)
    model = state["model"] if "model" in state else state
    assert any(k.endswith("default_ED") for k in model)


def test_the_trainer_state_saves_on_the_cpu_and_restores_exactly(micro_cfg, tmp_path):
    """TrainerState.save writes every tensor on the CPU; restore into a fresh state gives the
    same weights, optimizer moments, batcher position and step (the state the loop, save and
    resume share)."""
    from moelab import checkpoint
    from moelab.train import _build_state
    from moelab.world import LocalWorld

    cfg = micro_cfg("train.steps=2", "train.eval_every=0", "train.ckpt_every=2")
    train(cfg, tmp_path, progress=False)
    state = checkpoint.load(tmp_path)
    tensors = [*state["model"].values()]
    tensors += [t for s in state["optimizer"]["state"].values() for t in s.values()]
    assert all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))
    corpus = load_corpus(cfg.data)
    st = _build_state(cfg, corpus, LocalWorld(), torch.device("cpu"))
    st.restore(tmp_path)
    assert st.step == 2 and st.batcher.step == state["batcher"]["step"]
    for k, v in st.model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    again = st.state_dict()
    for idx, s in state["optimizer"]["state"].items():
        for key, t in s.items():
            assert torch.equal(again["optimizer"]["state"][idx][key], t), (idx, key)


def _losses(folder) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_rows(folder / "metrics.jsonl") if "loss" in r}


@pytest.mark.cuda
@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_moves_between_cuda_and_the_cpu(micro_cfg, tmp_path, first, then):
    """4 steps on one device, a checkpoint, 4 more on the other (train.device may change on
    resume) log the losses of 8 steps on the CPU to rtol 1e-4 (fp32; the devices' kernels
    differ in the last bits). Resumed on its own device the run matches its uninterrupted
    twin: exactly on the CPU, to rtol 1e-5 on CUDA (its atomic index_add sums in no fixed
    order, so two CUDA runs need not agree in the last bit either)."""
    sets = ("train.steps=8", "train.eval_every=0", "train.log_every=1")
    cpu = micro_cfg(*sets, "train.device='cpu'")
    train(cpu, tmp_path / "ref", progress=False)
    train(micro_cfg(*sets, f"train.device='{first}'"), tmp_path / "x", max_steps=4, progress=False)
    train(micro_cfg(*sets, f"train.device='{then}'"), tmp_path / "x", resume=True, progress=False)
    ref, moved = _losses(tmp_path / "ref"), _losses(tmp_path / "x")
    assert sorted(moved) == list(range(1, 9))
    for step, loss in ref.items():
        assert moved[step] == pytest.approx(loss, rel=1e-4), step
    same = micro_cfg(*sets, f"train.device='{first}'")
    train(same, tmp_path / "full", progress=False)
    train(same, tmp_path / "part", max_steps=4, progress=False)
    train(same, tmp_path / "part", resume=True, progress=False)
    full, part = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(part) == sorted(full)
    for step, loss in full.items():
        assert part[step] == pytest.approx(loss, rel=0 if first == "cpu" else 1e-5), step
