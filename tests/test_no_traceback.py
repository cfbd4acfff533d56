"""Issue 20: every bad input or fault ends in one clear line, never a Python traceback, and
loses nothing.

``test_every_case_gives_one_line_and_loses_nothing`` is the table: each row is a command line
(run in-process through ``moelab.cli.main``, as ``python -m moelab`` runs it), the exit status
it must end with and a phrase its one stderr line must hold; every row also checks that the
trained run folder and the other prepared files are byte for byte unchanged.
``test_any_set_value_is_accepted_or_named`` feeds random values to every ``--set`` key.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moelab import cli
from moelab.config import to_dict
from moelab.lab.spec import EXPERIMENTS
from moelab.runconfig import RunConfig, load_run_config
from moelab.train import build_model

MICRO = str(Path(__file__).parent / "fixtures" / "micro.toml")
TRACE_FORMAT = "moelab-routing-trace/1"


def _trace(**change) -> dict:
    experts = [torch.randint(0, 4, (64, 2), generator=torch.Generator().manual_seed(0))]
    trace = {"format": TRACE_FORMAT, "experts": experts, "num_experts": 4, "d_model": 8}
    return trace | change


# name -> (trace content, a phrase of its error); None: random bytes, "truncated": a cut file
TRACES = {
    "bytes": (None, "cannot read it as a torch file"),
    "truncated": ("truncated", "cannot read it as a torch file"),
    "list": ([1, 2], "is not a moelab routing trace"),
    "no_format": ({"experts": []}, "is not a moelab routing trace"),
    "no_num_experts": ({"format": TRACE_FORMAT, "experts": []}, "num_experts=None"),
    "num_experts_str": (_trace(num_experts="x"), "num_experts='x' is not allowed"),
    "d_model_negative": (_trace(d_model=-3), "d_model=-3 is not allowed"),
    "experts_not_list": (_trace(experts=5), "experts must be a non-empty list"),
    "experts_empty": (_trace(experts=[]), "experts must be a non-empty list"),
    "layer_1d": (_trace(experts=[torch.zeros(64).long()]), "expected a 2-D integer tensor"),
    "float_ids": (_trace(experts=[torch.rand(64, 2)]), "expected a 2-D integer tensor"),
    "ids_out_of_range": (_trace(experts=[torch.full((64, 2), 9)]), "allowed: [0, num_experts"),
    "ids_negative": (_trace(experts=[torch.full((64, 2), -1)]), "allowed: [0, num_experts"),
    "one_token": (_trace(experts=[torch.zeros(1, 2).long()]), "expected (T >= 2"),
    "ragged_layers": (_trace(experts=[torch.zeros(64, 2).long(), torch.zeros(9, 2).long()]),
                      "different numbers of tokens"),
    "counts_1d": ({"format": TRACE_FORMAT, "counts": torch.ones(4).long(), "num_experts": 4,
                   "d_model": 8}, "counts is a Tensor"),
    "counts_negative": ({"format": TRACE_FORMAT, "counts": -torch.ones(1, 4).long(),
                         "num_experts": 4, "d_model": 8}, "counts must be >= 0"),
}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A trained 2-step micro run, trace files, a text file and malformed experiment files."""
    from moelab.train import train

    root = tmp_path_factory.mktemp("cases")
    run = root / "run"
    train(load_run_config(MICRO, ["train.eval_every=0"]), run, max_steps=2, progress=False)
    paths = {"root": root, "run": run}
    for name, (content, _) in TRACES.items():
        path = root / f"{name}.pt"
        if content is None:
            path.write_bytes(os.urandom(300))
        elif content == "truncated":
            torch.save(_trace(), path)
            path.write_bytes(path.read_bytes()[:200])
        else:
            torch.save(content, path)
    torch.save(_trace(), root / "good.pt")
    (root / "text.txt").write_text("some text to profile and fine-tune on\n" * 40)
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("not moelab's")
    head = (EXPERIMENTS / "collapse.toml").read_text()
    head = head.split("[[checks]]")[0]
    for name, check in {
        "check_missing_rhs": 'lhs = "aux.maxvio_global"\nop = "<"\n',
        "check_typo": 'lhs = "a"\nop = "<"\nrhs = 1\nfactr = 2\n',
        "check_factor_str": 'lhs = "a"\nop = "<"\nrhs = 1\nfactor = "x"\n',
    }.items():
        (root / f"{name}.toml").write_text(f"{head}[[checks]]\n{check}")
    (root / "loop_a.toml").write_text(f'base = "{root / "loop_b.toml"}"\n')
    (root / "loop_b.toml").write_text(f'base = "{root / "loop_a.toml"}"\n')
    return paths


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _cases(w: dict[str, Path]) -> list[tuple[list[str], int, str]]:
    run, root = str(w["run"]), w["root"]
    train = ["train", "--config", MICRO, "--quiet", "--max-steps", "1", "--out", str(root / "t")]
    cases = [
        (["simulate-ep", str(root / f"{name}.pt"), "--out", str(root / "ep")], 2, phrase)
        for name, (_, phrase) in TRACES.items()
    ]
    cases += [
        (["simulate-ep", str(root / "good.pt"), "--out", run], 2, "holds a training run"),
        (["simulate-ep", str(root / "good.pt"), "--out", str(root / "ep"), "--bytes-per-elt",
          "0"], 2, "--bytes-per-elt 0"),
        (["simulate-ep", str(root / "text.txt"), "--from-run", run, "--out", str(root / "ep")],
         2, "not a moelab routing trace"),
        (["route", run, "--text", "ab\udcffcd"], 2, "not UTF-8"),
        (train + ["--set", "model.tie_embeddings=no"], 2, "model.tie_embeddings='no'"),
        (train + ["--set", "train.steps=2.5"], 2, "train.steps=2.5 is not allowed"),
        (train + ["--set", "model.moe.top_k=2.0"], 2, "top_k=2.0 is not allowed"),
        (train + ["--set", "parallel.ep=2"], 2, "parallel.ep=2 needs 2 or more processes"),
        (train + ["--set", "model.moe=5"], 2, "expected a table"),
        (["train", "--config", str(root / "loop_a.toml"), "--out", str(root / "t")], 2,
         "config base loop"),
        (["lab", "run", str(root / "check_missing_rhs.toml"), "--cached-only", "--out",
          str(root / "lab")], 2, "checks[0]: missing ['rhs']"),
        (["lab", "run", str(root / "check_typo.toml"), "--cached-only"], 2, "unknown key 'factr'"),
        (["lab", "run", "collapse", "--cached-only", "--out", run], 2, "holds a training run"),
        (["lab", "run", str(root / "check_factor_str.toml"), "--cached-only"], 2,
         "factor='x' is not allowed"),
    ]  # fmt: skip
    return cases


def _hf_cases(w: dict[str, Path]) -> list[tuple[list[str], int, str]]:
    run, root, hf, text = str(w["run"]), w["root"], str(w["hf"]), str(w["root"] / "text.txt")
    prof = ["profile", hf, "--data", text, "--out", str(root / "prof")]
    fine = ["finetune", hf, "--data", text, "--steps", "5"]
    return [
        (["export", run, "--out", run], 2, "holds a training run"),
        (["export", run, "--out", str(root / "notes")], 2, "holds other files (mine.txt)"),
        (prof + ["--dtype", "float64x"], 2, "--dtype 'float64x' is not allowed"),
        (prof + ["--device", "nosuch"], 2, "--device 'nosuch' is not a device"),
        (prof + ["--seq-len", "0"], 2, "--seq-len 0 is out of range"),
        (["profile", hf, "--data", text, "--out", run], 2, "holds a training run"),
        (["profile", hf, "--data", text, "--out", hf], 2, "holds other files"),
        (fine + ["--out", run], 2, "holds a training run"),
        (fine + ["--out", str(root / "ft"), "--lr", "1e35", "--grad-clip", "0"], 2,
         "loss is nan; lower --lr"),
    ]  # fmt: skip


def _one_line(capsys, argv: list[str]) -> tuple[int, str]:
    """Run ``moelab ARGV`` in-process; (exit status, its one stderr line besides notes)."""
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, (argv, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("moelab.hf:")]
    assert len(lines) == 1, (argv, err)
    return code, lines[0]


def test_every_case_gives_one_line_and_loses_nothing(world, capsys):
    """Malformed simulate-ep traces, a foreign or run folder as --out, non-UTF-8 route text,
    wrongly typed settings, parallel.ep outside torchrun, a base loop and malformed lab checks
    (and, with transformers, the export / profile / finetune cases): one line, the expected
    exit status, nothing changed in the prepared files."""
    cases = _cases(world)
    if _transformers():
        world["hf"] = _tiny_hf(world["root"])
        cases += _hf_cases(world)
    before = _snapshot(world["root"])
    for argv, status, phrase in cases:
        code, line = _one_line(capsys, argv)
        assert code == status and phrase in line, (argv, code, line)
        assert line.startswith(f"moelab {argv[0]}: "), line
        after = _snapshot(world["root"])
        changed = [k for k in before if after.get(k) != before[k]]
        assert not changed, (argv, changed)


def test_an_unexpected_exception_is_one_internal_error_line(world, capsys, monkeypatch):
    """A bug becomes `moelab CMD: internal error: ...` (exit 1) pointing at --debug; with
    --debug (before or after the command) the traceback is printed too."""
    from moelab import inspect

    def boom(*a, **k):
        raise TypeError("unexpected thing")

    monkeypatch.setattr(inspect, "load_trained", boom)
    argv = ["route", str(world["run"]), "--text", "hi"]
    code, line = _one_line(capsys, argv)
    assert code == 1 and "internal error: TypeError: unexpected thing" in line
    assert "--debug" in line
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        assert cli.main(debug) == 1
        assert "Traceback" in capsys.readouterr().err


def test_data_paths_are_stored_absolute(tmp_path, monkeypatch):
    """A relative --data path and cache folder are stored absolute, so eval and route read the
    same text from any directory; a resume with the old relative spelling is the same run."""
    from moelab.runfolder import check_resume

    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(MICRO, ["data.sources=['a.txt', 'd/*.md']", "data.domains=[]",
                                  "data.cache_dir='c'"])  # fmt: skip
    assert cfg.data.sources == (str(tmp_path / "a.txt"), str(tmp_path / "d" / "*.md"))
    assert cfg.data.cache_dir == str(tmp_path / "c")
    saved = to_dict(cfg)
    saved["data"]["sources"] = ["a.txt", "d/*.md"]
    check_resume(tmp_path, saved, to_dict(cfg))


def _transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _tiny_hf(root: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from moelab.hf.tiny import tiny_config

    path = root / "hf"
    if not path.exists():
        torch.manual_seed(0)
        kw = dict(layers=2, hidden=32, experts=4, top_k=2, vocab=128, max_len=64)
        AutoModelForCausalLM.from_config(tiny_config("mixtral", **kw)).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- property test


def _keys() -> list[str]:
    """Every leaf ``--set`` key of a run config (the micro config's shape)."""

    def leaves(d: dict, prefix: str) -> list[str]:
        out = []
        for k, v in d.items():
            out += leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
        return out

    return leaves(to_dict(load_run_config(MICRO)), "")


KEYS = _keys()
_SCALARS = st.one_of(
    st.integers(-5, 300).map(str),
    st.sampled_from(["0", "-1", "1", "2", "4", "1e3", "1e300", "2.5", "-0.5", "0.0", "1.0"]),
    st.sampled_from(["nan", "inf", "-inf", "true", "false", "'x'", "''", "[]", "[1, 2]",
                     "['a']", "{a = 1}", "no", "yes", "topk", "'global'"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)  # fmt: skip


def _outcome(key: str, text: str) -> str:
    """'ok' when ``--set KEY=TEXT`` gives a valid config whose model builds (on the meta
    device: shapes without memory), else the one-line ValueError, which must name the key."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = load_run_config(MICRO, [f"{key}={text}"])
            if cfg.model.n_layers <= 64:
                with torch.device("meta"):
                    build_model(cfg, _Vocab(512))
    except ValueError as exc:
        msg = str(exc)
        leaf = key.split(".")[-1]
        assert "\n" not in msg and leaf in msg, (key, text, msg)
        return msg
    assert isinstance(cfg, RunConfig)
    return "ok"


class _Vocab:
    """What ``build_model`` reads of a corpus."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(KEYS), text=_SCALARS)
def test_any_set_value_is_accepted_or_named(key, text):
    """Any value for any `--set` key: a valid config and model, or one ValueError line naming
    the key; never another exception (which the CLI would report as an internal error)."""
    _outcome(key, text)


def test_every_key_is_probed():
    """The property test's keys cover every section of the run config."""
    assert {k.split(".")[0] for k in KEYS} == {"model", "data", "train", "parallel"}
    assert "model.moe.router.method" in KEYS and "train.beta1" in KEYS
    assert json.dumps(KEYS)  # plain strings
