"""The family registry and the per-family checks on tiny random models of every MoE family.

A fast representative subset runs unmarked (one family per kind of layout: softmax re-selected,
grouped sigmoid with its own bias slot, top-k before softmax, dense sigmoid scores, a null
expert with a slot, a bias on the block passed as an argument, seq2seq with capacity); every
installed family runs under ``-m sweep`` (about 5 s each on an idle CPU; in neither of CI's
steps: ``scripts/hf_coverage.py`` measures the same checks for docs/hf.md). The table of
docs/hf.md must be what the registry and the measured ``results/hf_coverage.json`` give.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab.config import BalanceConfig  # noqa: E402
from moelab.hf import (  # noqa: E402
    attach,
    checks,  # noqa: E402
    find_routers,
)
from moelab.hf.docs import doc_drift  # noqa: E402
from moelab.hf.families import FAMILIES, SOFTMAX, family_table  # noqa: E402
from moelab.hf.tiny import family_model, moe_families  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


FAST = [
    "mixtral", "deepseek_v3", "granitemoe", "llama4", "zaya", "minimax_m2", "switch_transformers",
]  # fmt: skip
# Families whose checks do not all pass, and why (the coverage table says the same).
GAPS = {
    "doge": {"profile", "attach"},  # product-key experts: no `experts` module, no router
    "nllb-moe": {"attach"},  # top-2 with capacity and a random second-expert policy
    "phimoe": {"attach"},  # sparsemixer
}


def _expect(kind: str, what: str, reason: str | None) -> None:
    if what in GAPS.get(kind, set()):
        assert reason is not None, f"{kind}: {what} passes now; remove it from GAPS"
    else:
        assert reason is None, f"{kind}: {reason}"


def _all_checks(kind: str, tmp_path: Path) -> None:
    _expect(kind, "profile", checks.check_profile(family_model(kind)))
    if "attach" in GAPS.get(kind, set()):
        with pytest.raises(ValueError, match="profile works, attach does not"):
            attach(family_model(kind), BalanceConfig())
        return
    assert checks.check_identity(family_model(kind)) is None
    assert checks.check_bias_routes(family_model(kind)) is None
    assert checks.check_finetune(family_model(kind), tmp_path) is None


@pytest.mark.parametrize("kind", FAST)
def test_family_checks(kind, tmp_path):
    """Profile counts == the experts' own calls; attach at zero bias bit-identical; a large
    bias on expert 0 routes every token there; 5 finetune steps move the bias and the saved
    model reloads and routes as the tuned one."""
    _all_checks(kind, tmp_path)


@pytest.mark.sweep
@pytest.mark.parametrize("kind", moe_families())
def test_every_installed_family(kind, tmp_path):
    """The same checks on every MoE family of the installed transformers (GAPS excepted)."""
    if "profile" in GAPS.get(kind, set()):
        pytest.skip(f"{kind}: not profiled ({GAPS[kind]})")
    _all_checks(kind, tmp_path)


def test_unknown_router_gets_its_rule_inferred():
    """A router class in no registry row (a renamed Mixtral router) gets Mixtral's rule from
    its own forward on the probe batch, and attach at zero bias is bit-identical."""
    model = family_model("mixtral")
    renamed = type("MyRouter", (type(model.model.layers[0].mlp.gate),), {})
    for layer in model.model.layers:
        layer.mlp.gate.__class__ = renamed
    sites = find_routers(model)
    assert all(s.family is None and s.inferred for s in sites)
    assert sites[0].rule == SOFTMAX
    assert checks.check_identity(model) is None


def test_router_no_rule_reproduces_is_refused_in_one_line():
    """A router whose weights no candidate rule gives (halved) is profiled, but attach
    refuses with one line naming the class."""
    model = family_model("mixtral")
    base = type(model.model.layers[0].mlp.gate)

    def forward(self, h):
        logits, weights, experts = base.forward(self, h)
        return logits, weights * 0.5, experts

    odd = type("OddRouter", (base,), {"forward": forward})
    for layer in model.model.layers:
        layer.mlp.gate.__class__ = odd
    assert checks.check_profile(model) is None
    with pytest.raises(ValueError) as err:
        attach(model, BalanceConfig())
    assert "OddRouter" in str(err.value) and "\n" not in str(err.value)


def test_registry_rows_are_unique_and_documented():
    """Every router class is in one row at most, and docs/hf.md holds the generated registry
    table and the measured coverage table (``python scripts/hf_coverage.py`` rewrites them)."""
    classes = [c for fam in FAMILIES for c in fam.routers]
    assert len(classes) == len(set(classes))
    assert family_table().count("\n") == len(FAMILIES) + 2
    data = json.loads((ROOT / "results" / "hf_coverage.json").read_text())
    assert doc_drift(ROOT / "docs" / "hf.md", data) == []


def test_profile_of_a_router_that_never_fires():
    """Ernie-4.5-VL's vision experts never fire on text: their layers report 0 tokens, no
    crash, and the text experts' counts still equal the experts' own calls."""
    model = family_model("ernie4_5_vl_moe")
    sites = find_routers(model)
    assert not all(s.fired for s in sites)
    assert checks.check_profile(model) is None


def test_null_experts_are_counted_apart():
    """LongCat's zero experts: profile counts cover the real experts only, the slots that went
    to zero experts are reported as null_slots, and counts + null = tokens × k."""
    from moelab.hf.profile import profile_model

    model = family_model("longcat_flash")
    with torch.no_grad():
        for s in find_routers(model):
            s.module.classifier.weight.normal_(0, 1.0)  # wide scores: some zero experts chosen
    result, _ = profile_model(model, {"a": checks.tokens(model, 1, 4).flatten()}, seq_len=16)
    for lay in result["layers"]:
        assert lay["num_null_experts"] == 2 and len(lay["counts"]) == 8
        assert sum(lay["counts"]) + lay["null_slots"] == lay["tokens"] * lay["top_k"]
    assert any(lay["null_slots"] > 0 for lay in result["layers"])
