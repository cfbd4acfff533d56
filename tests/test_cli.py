"""The ``moelab`` command line, through a subprocess as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MICRO = str(Path(__file__).parent / "fixtures" / "micro.toml")


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "moelab", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"moelab {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["route"], ["presets"]])
def test_every_command_has_help(cmd):
    """``--help`` works for the program and every core command."""
    out = run(*cmd, "--help").stdout
    assert "usage: moelab" in out


def test_a_closed_pipe_ends_the_command_quietly():
    """``moelab lab list | head -0``: the reader closed stdout before the first line; the
    command stops with status 141 (128 + SIGPIPE) and nothing on stderr, not an "error"."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moelab", "lab", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    proc.stdout.close()  # before the interpreter has even imported moelab
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == ""


def test_train_route_eval_round_trip(tmp_path):
    """train writes metrics.jsonl with step/loss rows and eval rows with val_loss and
    maxvio_global; route and eval read the checkpoint back."""
    out = tmp_path / "run"
    run(
        "train",
        "--config",
        MICRO,
        "--out",
        str(out),
        "--max-steps",
        "4",
        "--quiet",
        "--set",
        "train.eval_every=2",
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r and "step" in r for r in rows)
    assert any("val_loss" in r and "maxvio_global" in r for r in rows)
    table = json.loads(run("route", str(out), "--text", "In the beginning", "--json").stdout)
    assert len(table["layers"]) == 2 and len(table["layers"][0]) == len(table["tokens"])
    assert all(len(experts) == 2 for experts in table["layers"][0])
    res = json.loads(run("eval", str(out), "--json", "--max-tokens", "512").stdout)
    assert res["val_loss"] > 0


def _error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_input_gives_one_line_errors(tmp_path):
    """Missing/empty/binary data, a config typo, k > E, a missing checkpoint and an
    unwritable folder each give one line saying what to fix, exit status 2."""
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 10)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    base = ["train", "--config", MICRO, "--quiet", "--max-steps", "1"]
    out = ["--out", str(tmp_path / "o")]
    cases = [
        (base + out + ["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (base + out + ["--data", str(binary)], "binary"),
        (base + out + ["--data", str(empty)], "empty"),
        (base + out + ["--set", "model.moe.top_kk=2"], "did you mean 'model.moe.top_k'"),
        (base + out + ["--set", "model.moe.top_k=5"], "top_k=5 is out of range"),
        (["eval", str(tmp_path / "nothing")], "checkpoint"),
        (["train", "--config", "nosuchpreset", "--out", str(tmp_path / "x")], "preset"),
        (base + ["--out", "/proc/moelab-unwritable"], "give a writable --out"),
    ]
    for args, message in cases:
        line = _error(run(*args, check=False))
        assert message in line, (args, line)


def test_checkpoint_from_another_config_is_refused(tmp_path):
    """Resuming a run folder with a different model config is refused with a clear message."""
    out = tmp_path / "run"
    run(
        "train",
        "--config",
        MICRO,
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--quiet",
        "--set",
        "train.eval_every=0",
    )
    line = _error(
        run(
            "train",
            "--config",
            MICRO,
            "--out",
            str(out),
            "--resume",
            "--quiet",
            "--set",
            "model.moe.num_experts=8",
            check=False,
        )
    )
    assert "another model config" in line


def test_run_folder_misuse_gives_one_line_and_loses_nothing(tmp_path):
    """A used --out without --resume, --max-steps below 1, --resume with --overwrite, a folder
    locked by a live process, and --resume to a step below the checkpoint each give one line;
    the finished run's files stay byte for byte."""
    import socket

    out = tmp_path / "run"
    base = ["train", "--config", MICRO, "--quiet", "--set", "train.eval_every=0"]
    run(*base, "--out", str(out), "--max-steps", "3")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    lock = {"pid": os.getpid(), "host": socket.gethostname()}
    cases = [
        ([], "pass --resume to continue it, --overwrite to replace it, or choose another --out"),
        (["--max-steps", "0"], "--max-steps 0 is out of range"),
        (["--max-steps", "-1", "--resume"], "--max-steps -1 is out of range"),
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
        (["--resume", "--ckpt-every", "-1"], "--ckpt-every -1 is out of range"),
        (["--resume", "--max-steps", "2"], "checkpoint in"),
        (["--resume", "--set", "train.lr=0.5"], "train.lr 0.01 -> 0.5"),
        (["--lock"], f"in use by process {os.getpid()}"),
    ]
    for extra, message in cases:
        if extra == ["--lock"]:
            (out / "train.lock").write_text(json.dumps(lock))
            extra = ["--resume"]
        line = _error(run(*base, "--out", str(out), *extra, check=False))
        assert message in line, (extra, line)
        (out / "train.lock").unlink(missing_ok=True)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, extra
    line = _error(run("eval", str(out), "--max-tokens", "-1", check=False))
    assert "--max-tokens -1 is out of range" in line


def test_ckpt_every_checkpoints_without_entering_the_recorded_config(tmp_path):
    """`--ckpt-every N` (what the lab passes to its torchrun variants) saves every N steps;
    config.json keeps the config's own train.ckpt_every, so a resume sees no change."""
    out = tmp_path / "run"
    base = ["train", "--config", MICRO, "--quiet", "--set", "train.eval_every=0", "--out"]
    run(*base, str(out), "--max-steps", "4", "--ckpt-every", "2")
    names = sorted(p.name for p in out.glob("ckpt-*.pt"))
    assert names[-2:] == ["ckpt-000002.pt", "ckpt-000004.pt"]
    assert json.loads((out / "config.json").read_text())["train"]["ckpt_every"] == 0
    run(*base, str(out), "--max-steps", "5", "--resume")


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    """SIGTERM (what torchrun and schedulers send before SIGKILL) ends `moelab train` after the
    step in progress with a checkpoint at it, one line saying so, and exit status 143."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moelab", "train", "--config", MICRO, "--out", str(out),
         "--quiet", "--max-steps", "100000", "--set", "train.eval_every=0",
         "--set", "train.log_every=1"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    while time.monotonic() < deadline and not (out / "metrics.jsonl").read_text():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "stopped by SIGTERM after step" in lines[0], err
    step = json.loads((out / "latest.json").read_text())["step"]
    assert f"after step {step};" in lines[0] and not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_torchrun_told_twice_to_stop_still_saves_every_rank_at_one_step(tmp_path):
    """torchrun's agent forwards each SIGTERM it gets to the ranks (in sessions of their own);
    a lab lane's group kill plus the pool worker's forward tell it twice. The ranks still
    finish the step in progress and save at it (before, the doubled signal escalated in the
    ranks and the run lost every step since its last checkpoint)."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "moelab", "train", "--config", "tiny", "--out", str(out), "--quiet",
         "--max-steps", "100000", "--set", "train.eval_every=0", "--set", "train.log_every=1",
         "--set", "parallel.ep=2", "--set", "train.threads=1", "--set", "train.warmup_steps=1",
         "--set", "train.tensorboard=false"],  # steps of ~0.1 s: the forward lands mid-step
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    deadline = time.monotonic() + 180
    rows = out / "metrics.jsonl"
    while time.monotonic() < deadline and not (rows.is_file() and len(rows.read_text()) > 0):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    pointer = json.loads((out / "latest.json").read_text())
    logged = [json.loads(x)["step"] for x in rows.read_text().splitlines() if '"loss"' in x]
    assert pointer["step"] == logged[-1] >= 1, log[-2000:]
    assert "stopped by SIGTERM after step" in log, log[-2000:]


def test_import_has_no_environment_side_effect_and_the_command_turns_on_huge_pages():
    """`import moelab` (and its CLI module) leaves os.environ as it was; main() sets
    THP_MEM_ALLOC_ENABLE=1 unless the user set it (issue 16: no import side effect)."""
    code = (
        "import os; before = dict(os.environ); import moelab, moelab.cli, moelab.lab;"
        "assert dict(os.environ) == before, 'import changed the environment';"
        "moelab.cli.main(['presets']);"
        "print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "1"
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # the user's choice is kept
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "0"


def test_eval_and_route_take_a_device(tmp_path):
    """eval / route load a checkpoint on ``--device`` (default: its train.device); a device
    that is not there, or a bad spelling, is one line naming the option."""
    out = tmp_path / "run"
    run("train", "--config", MICRO, "--out", str(out), "--max-steps", "1", "--quiet",
        "--set", "train.eval_every=0", "--set", "train.device='cpu'")  # fmt: skip
    res = json.loads(
        run("eval", str(out), "--json", "--max-tokens", "256", "--device", "cpu").stdout
    )
    assert res["val_loss"] > 0
    line = _error(run("route", str(out), "--text", "In the", "--device", "gpu", check=False))
    assert line.startswith("moelab route: error: --device='gpu' is not allowed")
    if not torch_cuda():
        line = _error(run("eval", str(out), "--device", "cuda", check=False))
        assert "--device='cuda' but CUDA is not available" in line


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
