"""Which balancing a model has as configured (moelab.hf.status), and loading any checkpoint.

Shape legend: B sequences, L sequence length.
"""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from moelab.config import BalanceConfig  # noqa: E402
from moelab.hf import attach, find_routers, main  # noqa: E402
from moelab.hf.profile import load_model  # noqa: E402
from moelab.hf.status import balancing_status  # noqa: E402
from moelab.hf.tiny import family_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_softmax_family_with_hf_aux_on():
    """Mixtral with output_router_logits: HF aux on with its coefficient, no warning."""
    model = family_model("mixtral")
    model.config.output_router_logits = True
    status = balancing_status(model, find_routers(model))
    assert status["hf_aux_loss"] == "on" and status["router_aux_loss_coef"] == pytest.approx(1e-3)
    assert status["warnings"] == [] and status["selection_bias"] == []


def test_sigmoid_bias_family_warns_and_attach_reports_it():
    """DeepSeek-V3 (sigmoid + a frozen correction bias): HF aux off by default, two warnings
    (softmax of sigmoid logits; a bias HF never updates), and attach says so before it acts."""
    model = family_model("deepseek_v3")
    status = balancing_status(model, find_routers(model))
    assert status["hf_aux_loss"] == "off"
    assert any("sigmoid" in w for w in status["warnings"])
    assert any("never updates" in w for w in status["warnings"])
    assert len(status["selection_bias"]) == len(find_routers(model))
    handle = attach(model, BalanceConfig(bias_rate=1e-3))
    lines = handle.describe()
    assert any("warning" in line and "sigmoid" in line for line in lines)
    assert any("own slot on 1" in line for line in lines)


def test_profile_json_names_the_balancing(tmp_path):
    """`profile` of a saved seq2seq model (Switch: loaded by the class its config names)
    writes the balancing block and counts over the encoder and decoder MoE layers."""
    model = family_model("switch_transformers")
    model.save_pretrained(tmp_path / "m")
    assert type(load_model(str(tmp_path / "m"))).__name__ == type(model).__name__
    (tmp_path / "t.txt").write_text("some text to route through the experts " * 8)
    argv = ["profile", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt")]
    assert main([*argv, "--out", str(tmp_path / "o"), "--seq-len", "16", "--no-plots"]) == 0
    prof = json.loads((tmp_path / "o" / "profile.json").read_text())
    assert prof["balancing"]["hf_aux_loss"] in ("on", "off")
    assert {"dropped_slots", "null_slots"} <= set(prof["layers"][0])
    assert len(prof["layers"]) == len(find_routers(model))


def test_bad_dtype_is_one_line(tmp_path, capsys):
    """--dtype outside the allowed values: one error line naming the field and the values."""
    family_model("olmoe").save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text("hello")
    argv = ["profile", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--dtype", "fp8"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "--dtype" in err[0] and "bfloat16" in err[0]
