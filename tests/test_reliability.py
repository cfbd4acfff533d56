"""Specification of moelab's reliability guarantees (issue 8; docs/reliability.md).

1. resume is bit-exact on CPU fp32, also in a new process (and under torchrun with EP = 2);
2. a 20-step run equals the committed golden loss file (``MOELAB_UPDATE_GOLDEN=1`` rewrites it);
3. EP = 1 and EP = 2 give the same curve (step 1 rtol 1e-6, 30 steps rtol 1e-4, same counts);
4. a save killed at any point leaves the previous complete checkpoint as the one that loads;
5. a truncated, missing or foreign checkpoint gives one line naming the file; other layouts
   load exactly or are refused saying what differs;
6. a dead or hung rank makes the others raise within parallel.timeout_s, naming rank and op;
7. a crash under ``torchrun --max-restarts=1 ... --resume`` ends like an uninterrupted run;
8. NaN/inf router logits or loss stop the run (naming layer and step) or skip the step, and
   never reach a checkpoint.

Everything runs on CPU. Faults are injected by ``train(on_step=...)`` hooks, by a child process
that exits inside ``os.replace`` / ``os.fsync``, or by ``MOELAB_CRASH_AT_STEP`` (test-only).
The EP tests need ``moelab.parallel`` and are skipped, saying so, without it.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ranks import spawn, values

from moelab import checkpoint
from moelab.checkpoint import CheckpointError
from moelab.logs import read_rows
from moelab.runconfig import load_run_config
from moelab.step import NonFiniteError
from moelab.train import train

MICRO = Path(__file__).parent / "fixtures" / "micro.toml"
GOLDEN = Path(__file__).parent / "golden" / "micro_losses.json"
N = 10  # resume tests: 2N steps == N steps + save + new process + N steps

# Every piece of state that resume must carry is live: loss-free bias, global-scope counts
# accumulated over 2 micro-batches, router jitter (RNG), dead-expert trackers, AdamW moments.
SETS = [
    f"train.steps={2 * N}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_max_tokens=256",
    f"train.ckpt_every={N}",
    "train.micro_batch_size=4",
    "train.threads=2",
    "model.moe.balance.bias_rate=0.01",
    "model.moe.balance.aux_coef=0.01",
    "model.moe.balance.aux_scope='global'",
    "model.moe.router.noise='jitter'",
]


def _cfg(*overrides: str):
    return load_run_config(str(MICRO), [*SETS, *overrides])


def _cli_sets(*overrides: str) -> list[str]:
    return [a for s in [*SETS, *overrides] for a in ("--set", s)]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_rows(out / "metrics.jsonl") if "loss" in r]


def _run(args: list[str], env: dict | None = None, timeout: float = 600):
    """A subprocess with the test session's environment (its private MOELAB_CACHE)."""
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        timeout=timeout,
    )


def _moelab(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = _run([sys.executable, "-m", "moelab", *args], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same(a, b, path: str = "state") -> None:
    """Recursive exact equality of checkpoint states (tensors with torch.equal)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 2N-step run (in this process), checkpoints at N and 2N."""
    out = tmp_path_factory.mktemp("reference")
    train(_cfg(), out, progress=False)
    return out


# ----------------------------------------------------------------------------- 1. exact resume


@pytest.mark.slow
def test_resume_in_a_new_process_is_bit_exact(reference, tmp_path):
    """`moelab train --max-steps N` then `moelab train --resume` (two new processes) equal the
    uninterrupted 2N-step run: the loss `==` at every step, and the final parameters, balance
    buffers (bias, step counts, progress), AdamW state, RNG states (torch, numpy, python),
    data position and dead-expert trackers are equal."""
    base = ["train", "--config", str(MICRO), "--out", str(tmp_path), "--quiet", *_cli_sets()]
    _moelab(*base, "--max-steps", str(N))
    assert checkpoint.latest(tmp_path)["step"] == N
    _moelab(*base, "--resume")
    assert _losses(tmp_path) == _losses(reference)
    assert len(_losses(tmp_path)) == 2 * N
    assert_same(checkpoint.load(tmp_path), checkpoint.load(reference))


def test_bf16_resume_is_exact(tmp_path):
    """Under bf16 autocast resume stays exact on CPU (its kernels are deterministic): 4 steps
    == 2 steps + resume + 2 steps, losses `==` and final parameters equal."""
    cfg = _cfg("train.dtype='bf16'", "train.steps=4", "train.ckpt_every=2")
    train(cfg, tmp_path / "full", progress=False)
    train(cfg, tmp_path / "part", max_steps=2, progress=False)
    train(cfg, tmp_path / "part", resume=True, progress=False)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
    full, part = (checkpoint.load(tmp_path / d) for d in ("full", "part"))
    assert_same(part["model"], full["model"])


# ----------------------------------------------------------------------------- 2. golden file


def _platform() -> dict:
    from moelab.lab.fingerprint import platform_id

    return platform_id()


def test_losses_equal_the_golden_file(reference):
    """The 20-step micro run's losses `==` tests/golden/micro_losses.json, recorded on the
    platform it names; on another platform (torch version, CPU kernels, CPU model) within
    rtol 1e-5.
    Refresh only on purpose: ``MOELAB_UPDATE_GOLDEN=1 pytest -k golden``, reason in the commit."""
    losses = _losses(reference)
    if os.environ.get("MOELAB_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        record = {
            "about": "moelab train losses of tests/fixtures/micro.toml + overrides, 1 per step; "
            "refreshed only on purpose (see docs/reliability.md)",
            "config": "tests/fixtures/micro.toml",
            "overrides": SETS,
            "platform": _platform(),
            "losses": losses,
        }
        GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == SETS, "the golden run's settings changed: refresh on purpose"
    assert len(losses) == 20
    if golden["platform"] == _platform():
        assert losses == golden["losses"]
    else:
        assert losses == pytest.approx(golden["losses"], rel=1e-5, abs=0), golden["platform"]


# ----------------------------------------------------------------------------- 4. killed saves

STATE = {"model": {"w": torch.arange(6.0)}, "config": {}, "step": 0}

# (patched function, which call, where the save is when it dies, whether the pointer moved)
KILL_POINTS = [
    ("fsync", 1, "checkpoint half-written to its .tmp", False),
    ("replace", 1, "checkpoint .tmp complete, not renamed", False),
    ("fsync", 2, "checkpoint renamed, folder not synced", False),
    ("fsync", 3, "pointer half-written to its .tmp", False),
    ("replace", 2, "pointer .tmp complete, not moved", False),
    ("fsync", 4, "pointer moved, folder not synced", True),
]


def _state(step: int) -> dict:
    return dict(STATE, model={"w": STATE["model"]["w"] + step}, step=step)


def _killed_save(folder: str, fn: str, nth: int) -> None:
    """Child process: save step 2, exiting (status 17) inside the nth call of os.<fn>; an
    fsync of a file first truncates it to half, as a write cut short would."""
    real = {"fsync": os.fsync, "replace": os.replace}
    calls = {"fsync": 0, "replace": 0}

    def patched(name):
        def call(*args):
            calls[name] += 1
            if calls[name] == nth and name == fn:
                if name == "fsync" and stat.S_ISREG(os.fstat(args[0]).st_mode):
                    os.ftruncate(args[0], os.fstat(args[0]).st_size // 2)
                os._exit(17)
            return real[name](*args)

        return call

    os.fsync, os.replace = patched("fsync"), patched("replace")
    checkpoint.save(folder, _state(2), 2, keep=2)
    os._exit(0)


@pytest.mark.parametrize("fn, nth, where, moved", KILL_POINTS, ids=[k[2] for k in KILL_POINTS])
def test_a_killed_save_leaves_the_previous_checkpoint_loading(tmp_path, fn, nth, where, moved):
    """A process killed anywhere in a save leaves latest.json naming a complete checkpoint:
    the previous one until the pointer has moved, the new one after. The next save removes
    the stale *.tmp files and never-pointed-at checkpoint files, and loads."""
    checkpoint.save(tmp_path, _state(1), 1, keep=2)
    child = multiprocessing.get_context("fork").Process(
        target=_killed_save, args=(str(tmp_path), fn, nth)
    )
    child.start()
    child.join(60)
    assert child.exitcode == 17, f"the save was not killed at {where}"
    state = checkpoint.load(tmp_path)
    assert state["step"] == (2 if moved else 1)
    assert torch.equal(state["model"]["w"], _state(state["step"])["model"]["w"])
    checkpoint.save(tmp_path, _state(3), 3, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000003.pt", "latest.json"]
    assert checkpoint.load(tmp_path)["step"] == 3


def test_pruning_never_deletes_the_checkpoint_the_pointer_names(tmp_path):
    """A checkpoint file newer than the pointer (a save killed before the pointer moved, then a
    resume from an earlier step) is dropped at the next save; the pointer's file is kept."""
    checkpoint.save(tmp_path, _state(1), 1, keep=1)
    shutil.copy(tmp_path / "ckpt-000001.pt", tmp_path / "ckpt-000005.pt")  # orphan
    checkpoint.save(tmp_path, _state(2), 2, keep=1)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000002.pt"]
    assert checkpoint.load(tmp_path)["step"] == 2


_KILL_IN_TRAIN = """
import os, sys
real, calls = os.replace, [0]
def replace(*a):
    calls[0] += 1
    if calls[0] == int(sys.argv[1]):
        os._exit(17)
    return real(*a)
os.replace = replace
from moelab.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_run_killed_while_saving_resumes_exactly(reference, tmp_path):
    """A run killed just before its step-2N save moves the pointer resumes from step N (no
    hang, no half-written file loaded) and ends exactly like the uninterrupted run."""
    args = ["train", "--config", str(MICRO), "--out", str(tmp_path), "--quiet", *_cli_sets()]
    # os.replace calls: step-N checkpoint, pointer; step-2N checkpoint, pointer (the 4th).
    proc = _run([sys.executable, "-c", _KILL_IN_TRAIN, "4", *args])
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert checkpoint.latest(tmp_path)["step"] == N
    assert (tmp_path / f"ckpt-{2 * N:06d}.pt").exists()  # complete, but never pointed at
    _moelab(*args, "--resume")
    assert _losses(tmp_path) == _losses(reference)
    assert_same(checkpoint.load(tmp_path), checkpoint.load(reference))


# ----------------------------------------------------------------------------- 5. bad files


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


def _cli_error(capsys, *args: str) -> str:
    """moelab's main() in this process: exit status 2 and exactly one stderr line."""
    from moelab.cli import main

    capsys.readouterr()
    assert main(list(args)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def _corrupt(folder: Path, how: str) -> tuple[Path, str, str]:
    """Damage a copy of a run folder; returns (path to load, file to name, message part)."""
    name = checkpoint.latest(folder)["file"]
    ckpt = folder / name
    if how == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        return folder, str(ckpt), "SHA-256 mismatch"
    if how == "altered":
        data = bytearray(ckpt.read_bytes())
        data[len(data) // 2] ^= 1
        ckpt.write_bytes(bytes(data))
        return folder, str(ckpt), "truncated or altered"
    if how == "missing":
        ckpt.unlink()
        return folder, str(ckpt), "is missing"
    if how == "pointer":
        (folder / "latest.json").write_text('{"file": "ckpt-0')
        return folder, str(folder / "latest.json"), "is corrupt"
    if how == "random":
        blob = folder / "random.pt"
        blob.write_bytes(np.random.default_rng(0).bytes(4096))
        return blob, str(blob), "not a moelab checkpoint"
    if how == "foreign":
        other = folder / "weights.pt"
        torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
        return other, str(other), "not a moelab checkpoint (no 'model')"
    raise AssertionError(how)


BAD = ["truncated", "altered", "missing", "pointer", "random", "foreign"]


@pytest.mark.parametrize("how", BAD)
def test_a_bad_checkpoint_gives_one_line_naming_the_file(reference, tmp_path, capsys, how):
    """A truncated / altered file (SHA-256 in latest.json), a pointer to a missing file, a corrupt
    pointer, random bytes or another program's torch file: CheckpointError from the API and one
    line with exit status 2 from `moelab eval`, both naming the file."""
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    path, named, part = _corrupt(folder, how)
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(path)
    assert named in _one_line(err.value) and part in str(err.value)
    line = _cli_error(capsys, "eval", str(path), "--max-tokens", "64")
    assert named in line and part in line


@pytest.mark.slow
def test_resume_from_a_truncated_checkpoint_fails_in_a_new_process(reference, tmp_path):
    """The same through a real `moelab train --resume` process: exit 2, one line, no traceback."""
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    _, named, part = _corrupt(folder, "truncated")
    proc = _run(
        [sys.executable, "-m", "moelab", "train", "--config", str(MICRO), "--out", str(folder)]
        + ["--resume", "--quiet", *_cli_sets()]
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert named in lines[0] and part in lines[0] and "Traceback" not in proc.stderr


def test_a_checkpoint_from_another_batch_layout_is_refused(reference, tmp_path):
    """Checkpoints hold the single-process layout, so any EP size may resume them; but with
    parallel.batch='per_rank' the world size sets the batch, and a change is refused naming
    both world sizes."""
    state = checkpoint.load(reference)
    state["layout"] = {"world_size": 2, "ep": 2}
    checkpoint.save(tmp_path, state, state["step"])
    with pytest.raises(CheckpointError, match="written by 2 ranks with parallel.batch='per_rank'"):
        train(_cfg("parallel.batch='per_rank'"), tmp_path, resume=True, progress=False)


# ----------------------------------------------------------------------------- 7. restarts


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, capsys):
    """`--resume` on a folder with no checkpoint yet starts at step 0 (with a note), so one
    command line serves the first attempt and every restart."""
    train(_cfg(), tmp_path, resume=True, max_steps=2, progress=False)
    assert "no checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2]


def _torchrun(nproc: int, *args: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.5",
        "-m",
        "moelab",
        *args,
    ]


@pytest.mark.slow
def test_torchrun_restart_after_a_crash_ends_like_an_uninterrupted_run(reference, tmp_path):
    """`torchrun --max-restarts=1 -m moelab train ... --resume` (one process, LocalWorld) with a
    crash injected before step N + 5 restarts, resumes from the step-N checkpoint and logs the
    same losses as the uninterrupted run."""
    args = ["train", "--config", str(MICRO), "--out", str(tmp_path), "--quiet", "--resume"]
    proc = _run(
        _torchrun(1, *args, *_cli_sets(), restarts=1), env={"MOELAB_CRASH_AT_STEP": str(N + 5)}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected crash before step 15" in proc.stderr
    assert _losses(tmp_path) == _losses(reference)


# ----------------------------------------------------------------------------- 8. NaN / inf


def _nan_router_weight(at: int, layer: int):
    """on_step hook: MoE layer ``layer``'s router weight becomes NaN at step ``at``."""

    def hook(step, model):
        if step == at:
            with torch.no_grad():
                model.moe_layers[layer].router.weight.fill_(float("nan"))

    return hook


def _nan_during(at: int, module, pre: bool):
    """on_step hook: the input (``pre``) or output of ``module(model)`` is NaN in step ``at``."""
    handle = {}

    def nan_input(m, args):
        return (args[0] * float("nan"), *args[1:])

    def nan_output(m, args, out):
        return out * float("nan")

    def hook(step, model):
        if step == at:
            m = module(model)
            handle["h"] = (
                m.register_forward_pre_hook(nan_input)
                if pre
                else m.register_forward_hook(nan_output)
            )
        elif "h" in handle:
            handle.pop("h").remove()

    return hook


def _nan_moe_input_at(at: int, layer: int):
    """NaN activations enter MoE layer ``layer``: its router logits are NaN."""
    return _nan_during(at, lambda model: model.moe_layers[layer], pre=True)


def _nan_loss_at(at: int):
    """The final norm outputs NaN: the loss is NaN while every router stays finite."""
    return _nan_during(at, lambda model: model.norm, pre=False)


def _hooks(*hooks):
    def run(step, model):
        for h in hooks:
            h(step, model)

    return run


def test_nan_router_logits_stop_the_run_naming_layer_and_step(tmp_path):
    """train.nonfinite='stop': NaN router weights in MoE layer 1 at step 3 raise NonFiniteError
    at step 3, one line naming the layer and the step; the latest checkpoint is step 2's."""
    cfg = _cfg("train.ckpt_every=1", "train.nonfinite='stop'")
    with pytest.raises(NonFiniteError) as err:
        train(cfg, tmp_path, progress=False, on_step=_nan_router_weight(3, layer=1))
    msg = _one_line(err.value)
    assert "router logits" in msg and "MoE layer 1" in msg and "step 3" in msg
    assert checkpoint.latest(tmp_path)["step"] == 2


def test_nan_loss_stops_the_run_naming_the_step(tmp_path):
    """train.nonfinite='stop': a NaN loss at step 2 raises NonFiniteError naming step 2."""
    with pytest.raises(NonFiniteError, match="non-finite loss .* at step 2;"):
        train(_cfg(), tmp_path, max_steps=3, progress=False, on_step=_nan_loss_at(2))


def test_nonfinite_steps_are_skipped_and_the_run_goes_on(tmp_path):
    """train.nonfinite='skip': NaN router logits (NaN input to MoE layer 1, step 2) and a NaN
    loss (step 4) each skip their step: no optimizer step, no balance update (parameters, bias
    and progress unchanged; step counts reset), a `skipped` row naming the cause; the other
    steps train on and every checkpoint is finite."""
    cfg = _cfg("train.ckpt_every=1", "train.nonfinite='skip'")
    seen = {}

    def snapshot(step, model):
        seen[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    hooks = _hooks(_nan_moe_input_at(2, layer=1), _nan_loss_at(4), snapshot)
    train(cfg, tmp_path, max_steps=5, progress=False, on_step=hooks)
    rows = read_rows(tmp_path / "metrics.jsonl")
    skipped = {r["step"]: r["nonfinite"] for r in rows if r.get("skipped")}
    assert sorted(skipped) == [2, 4]
    assert "router logits" in skipped[2] and "MoE layer 1" in skipped[2]
    assert "non-finite loss" in skipped[4]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == [1, 3, 5] and all(math.isfinite(v) for v in losses.values())
    for a, b in ((2, 3), (4, 5)):  # a skipped step changes nothing
        for k, v in seen[a].items():
            assert torch.equal(v, seen[b][k]), (a, k)
    assert all(int(seen[5][k].abs().sum()) == 0 for k in seen[5] if k.endswith("step_counts"))
    for step in (4, 5):  # keep_checkpoints=2; each one finite
        state = checkpoint.load(tmp_path / f"ckpt-{step:06d}.pt")
        assert all(
            torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()
        )


def test_nan_parameters_never_reach_a_checkpoint(tmp_path):
    """A parameter made NaN at step 3 (skip mode: the step is skipped) makes the step-3 save
    refuse with CheckpointError naming the tensor; latest.json still names step 2's file."""

    def poison(step, model):
        if step == 3:
            with torch.no_grad():
                model.norm.weight[0] = float("nan")

    cfg = _cfg("train.ckpt_every=1", "train.nonfinite='skip'")
    with pytest.raises(CheckpointError, match="refusing to save checkpoint 3: model tensor 'norm"):
        train(cfg, tmp_path, max_steps=4, progress=False, on_step=poison)
    assert checkpoint.latest(tmp_path)["step"] == 2
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "ckpt-000003.pt").exists()


def test_checkpoint_save_refuses_nonfinite_optimizer_state(tmp_path):
    """checkpoint.save itself refuses any NaN/inf tensor in the model or optimizer state."""
    bad = dict(_state(1), optimizer={"state": {0: {"exp_avg": torch.tensor([1.0, math.inf])}}})
    with pytest.raises(CheckpointError, match="'exp_avg' of parameter 0 is not finite"):
        checkpoint.save(tmp_path, bad, 1)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- EP (parallel)


def _parallel_missing() -> str | None:
    try:
        import moelab.parallel  # noqa: F401
    except ImportError as exc:
        return f"moelab.parallel is not available ({exc}); the EP reliability tests need it"
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this build"
    return None


needs_parallel = pytest.mark.skipif(
    _parallel_missing() is not None, reason=str(_parallel_missing())
)
EP = ["parallel.ep=2", "parallel.timeout_s=60", "train.threads=1"]


@pytest.fixture(scope="module")
def ep2_reference(tmp_path_factory) -> Path:
    """The uninterrupted 2N-step run under torchrun, 2 gloo ranks, EP = 2."""
    out = tmp_path_factory.mktemp("ep2")
    args = ["train", "--config", str(MICRO), "--out", str(out), "--quiet", *_cli_sets(*EP)]
    proc = _run(_torchrun(2, *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@needs_parallel
@pytest.mark.slow
def test_ep2_resume_under_torchrun_is_bit_exact(ep2_reference, tmp_path):
    """Under torchrun with 2 gloo ranks and EP = 2: N steps, then a new torchrun --resume for N
    more, equal the uninterrupted run (losses `==`, the whole final checkpoint equal)."""
    base = ["train", "--config", str(MICRO), "--out", str(tmp_path), "--quiet", *_cli_sets(*EP)]
    for extra in (["--max-steps", str(N)], ["--resume"]):
        proc = _run(_torchrun(2, *base, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(tmp_path) == _losses(ep2_reference)
    assert_same(checkpoint.load(tmp_path), checkpoint.load(ep2_reference))


@needs_parallel
@pytest.mark.slow
def test_ep2_torchrun_restart_after_a_crash_ends_like_an_uninterrupted_run(ep2_reference, tmp_path):
    """`torchrun --max-restarts=1 --nproc-per-node 2 -m moelab train ... --resume` (EP = 2) with
    a crash before step N + 5 on every rank restarts and logs the uninterrupted run's losses."""
    args = ["train", "--config", str(MICRO), "--out", str(tmp_path), "--quiet", "--resume"]
    # No TORCH_DISABLE_SHARE_RDZV_TCP_STORE: moelab prefixes its store keys per restart
    # attempt, so restarted workers never read the dead attempt's gloo keys (pytorch#135712).
    env = {"MOELAB_CRASH_AT_STEP": str(N + 5)}
    proc = _run(_torchrun(2, *args, *_cli_sets(*EP), restarts=1), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected crash before step 15" in proc.stderr
    assert _losses(tmp_path) == _losses(ep2_reference)


# Same init and global batch, one forward pass each, no router noise (each rank draws its own):
# EP = 1 and EP = 2 compute the same function up to summation order.
EP_COMPARE = [
    "train.steps=30",
    "train.ckpt_every=0",
    "train.micro_batch_size=0",  # one pass per rank: global-scope counts see the same tokens
    "model.moe.router.noise='none'",
]


@needs_parallel
@pytest.mark.slow
def test_ep1_and_ep2_train_the_same_curve(tmp_path):
    """EP = 1 (one process) vs EP = 2 (torchrun, 2 ranks): step-1 loss within rtol 1e-6, the
    30-step curve within rtol 1e-4 (fp32), and the same expert counts at every step."""
    train(_cfg(*EP_COMPARE), tmp_path / "ep1", progress=False)
    args = ["train", "--config", str(MICRO), "--out", str(tmp_path / "ep2"), "--quiet"]
    proc = _run(_torchrun(2, *args, *_cli_sets(*EP_COMPARE, *EP)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (
        [r for r in read_rows(tmp_path / d / "metrics.jsonl") if "loss" in r]
        for d in ("ep1", "ep2")
    )
    assert len(one) == len(two) == 30
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6, abs=0)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-4, abs=0)
    assert [r["counts_layers"] for r in two] == [r["counts_layers"] for r in one]


# -- spawned ranks (torch.multiprocessing, gloo), for tests that need hooks inside a rank


def _load_worker(rank: int, folder: str) -> dict | None:
    """Resume a single-process checkpoint at EP = 2 and gather the state back (rank 0)."""
    from moelab import train as tr
    from moelab.data import Batcher, load_corpus
    from moelab.metrics import DeadExpertTracker
    from moelab.parallel import DistributedWorld

    torch.set_num_threads(1)
    cfg = _cfg(*EP)
    world = DistributedWorld(cfg.parallel)
    corpus = load_corpus(cfg.data)
    cfg, model = tr.build_model(cfg, corpus)
    model = world.prepare(model, cfg)
    opt = tr.make_optimizer(model, cfg.train)
    batcher = Batcher(
        corpus,
        batch_size=cfg.train.batch_size,
        seq_len=cfg.data.seq_len,
        mode=cfg.data.batch_mode,
        seed=cfg.train.seed,
    )
    trackers = [DeadExpertTracker(m.cfg.num_experts, top_k=m.cfg.top_k) for m in model.moe_layers]
    step = tr._restore(Path(folder), cfg, model, opt, batcher, trackers, world)
    state = {
        "model": world.full_state_dict(model),
        "optimizer": world.optimizer_state(opt, model),
        "step": step,
        "expert_rows": int(model.moe_layers[0].experts.w2_EFD.shape[0]),
    }
    return state if rank == 0 else None


@needs_parallel
@pytest.mark.slow
def test_a_single_process_checkpoint_loads_exactly_at_ep2(reference):
    """A checkpoint written by one process resumes at EP = 2 with each rank holding half the
    experts, and gathering them back gives the checkpoint's model and AdamW state exactly."""
    got = values(spawn(2, _load_worker, str(reference), timeout=300, expect=2), 2)[0]
    want = checkpoint.load(reference)
    assert got["step"] == want["step"] and got["expert_rows"] == 2
    assert_same(got["model"], want["model"])
    assert_same(got["optimizer"], want["optimizer"])


def _failing_rank_worker(rank: int, mode: str, timeout_s: float, out: str) -> float:
    """Train at EP = 2; at step 2 rank 1 dies or hangs right before its experts run, i.e.
    between the dispatch and the combine all-to-all. Rank 0 reports its error and wait."""
    torch.set_num_threads(1)
    t0 = {}

    def hook(step, model):
        if step != 2:
            return
        t0["t"] = time.monotonic()
        if rank == 1:

            def fail(*_):
                if mode == "die":
                    os._exit(3)
                time.sleep(10 * timeout_s)

            model.moe_layers[1].experts.register_forward_pre_hook(fail)

    cfg = _cfg(*EP, f"parallel.timeout_s={timeout_s}", "train.ckpt_every=0")
    try:
        train(cfg, out, max_steps=4, progress=False, on_step=hook)
    except Exception as exc:  # noqa: BLE001 - the message and the wait are the result
        waited = time.monotonic() - t0["t"]
        raise RuntimeError(f"after {waited:.1f}s: {type(exc).__name__}: {exc}") from None
    return -1.0


@needs_parallel
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_hung_rank_makes_the_others_raise_within_the_timeout(tmp_path, mode):
    """A rank that exits or hangs in the middle of an MoE layer (after the dispatch all-to-all,
    before the combine) makes rank 0 raise DistributedError within parallel.timeout_s = 10 s,
    naming its rank and the operation, instead of waiting forever."""
    timeout_s = 10.0
    res = spawn(2, _failing_rank_worker, mode, timeout_s, str(tmp_path), timeout=300, expect=1)
    status, message = res[0]
    assert status == "error", message
    assert "DistributedError" in message and "rank 0 of 2" in message, message
    # A dead peer may be noticed while the dispatch exchange is still finishing.
    assert ("all_to_all (" if mode == "die" else "all_to_all (combine)") in message, message
    waited = float(message.split("after ")[1].split("s:")[0])
    assert waited < timeout_s + 10, message
