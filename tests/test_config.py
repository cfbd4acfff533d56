"""Config validation: every bad input raises a ValueError naming the field and what is allowed;
dict / TOML / ``--set`` round trips."""

from __future__ import annotations

import pytest
import torch

import moelab
from moelab import dispatch
from moelab.config import (
    BalanceConfig,
    CapacityConfig,
    MoEConfig,
    RouterConfig,
    apply_overrides,
    from_dict,
    load_toml,
    to_dict,
)

SIZES = dict(d_model=8, num_experts=4, top_k=2, d_expert=6)


def moe(**kw) -> MoEConfig:
    return MoEConfig(**{**SIZES, **kw})


def raises(*words: str):
    """pytest.raises(ValueError) whose message contains every word (field, allowed values)."""
    return pytest.raises(ValueError, match="(?s)" + "".join(f"(?=.*{w})" for w in words))


# ----------------------------------------------------------------------------- top-k, sizes


@pytest.mark.parametrize("k", [5, 0, -1])
def test_top_k_outside_one_to_num_experts(k):
    """k > E and k < 1 name moe.top_k and the allowed range [1, num_experts]."""
    with raises("moe.top_k", r"\[1, moe.num_experts=4\]"):
        moe(top_k=k)


def test_top_k_must_be_an_integer():
    """A float k is rejected with the same message."""
    with raises("moe.top_k", "integer"):
        moe(top_k=1.5)


@pytest.mark.parametrize("field", ["d_model", "num_experts", "d_expert"])
def test_sizes_must_be_positive(field):
    """Zero sizes name the field and the allowed range."""
    with raises(f"moe.{field}", "allowed", r"\[1, inf\]"):
        moe(**{field: 0})


def test_top_k_beyond_the_kept_groups():
    """Group-limited routing: k larger than the experts in the kept groups is rejected."""
    with raises("moe.top_k", "topk_groups", "allowed"):
        moe(num_experts=8, top_k=3, router=RouterConfig(num_groups=4, topk_groups=1))


def test_groups_must_divide_experts():
    with raises("router.num_groups", "divisor"):
        moe(router=RouterConfig(num_groups=3, topk_groups=1))


# ----------------------------------------------------------------------------- capacity


@pytest.mark.parametrize("factor", [-0.5, -1.0, float("nan")])
def test_capacity_factor_must_be_non_negative(factor):
    """CF < 0 is invalid (0 = dropless is allowed); the message names capacity.factor."""
    with raises("capacity.factor", "allowed", r"\[0, inf\]"):
        CapacityConfig(factor=factor)
    assert CapacityConfig(factor=0.0).factor == 0.0


def test_eval_capacity_factor():
    """eval_factor: -1 (same as training) or >= 0; -0.5 names capacity.eval_factor."""
    with raises("capacity.eval_factor", "allowed"):
        CapacityConfig(eval_factor=-0.5)
    assert CapacityConfig(factor=2.0).factor_for(training=False) == 2.0
    assert CapacityConfig(factor=2.0, eval_factor=0.0).factor_for(training=False) == 0.0


def test_capacity_function_rejects_a_negative_factor():
    """dispatch.capacity(factor < 0) names the factor and the allowed values."""
    with raises("capacity factor", "allowed", ">= 0"):
        dispatch.capacity(16, 2, 4, -1.0)


@pytest.mark.parametrize(
    "cls, field, value",
    [
        (RouterConfig, "gumbel_tau", 0.0),
        (RouterConfig, "expert_mask_prob", 1.0),
        (RouterConfig, "sinkhorn_iters", 0),
        (RouterConfig, "noise_std", -0.1),
        (BalanceConfig, "aux_coef", -0.01),
        (BalanceConfig, "bias_rate", -1.0),
        (BalanceConfig, "num_devices", 0),
    ],
)
def test_out_of_range_numbers(cls, field, value):
    """Numbers outside their range name '<section>.<field>' and the allowed interval."""
    with raises(f"{cls._prefix}.{field}", "allowed"):
        cls(**{field: value})


def test_expert_dropout_must_be_below_one():
    with raises("moe.expert_dropout", r"\[0, 1\)"):
        moe(expert_dropout=1.0)


# ----------------------------------------------------------------------------- Literal choices


@pytest.mark.parametrize(
    "cls, field, allowed",
    [
        (RouterConfig, "method", "expert_choice"),
        (RouterConfig, "score", "sigmoid"),
        (RouterConfig, "noise", "gumbel"),
        (BalanceConfig, "aux_scope", "sequence"),
        (BalanceConfig, "bias_rule", "multiplicative"),
        (BalanceConfig, "bias_schedule", "cosine"),
        (CapacityConfig, "policy", "position"),
    ],
)
def test_bad_literal_choices(cls, field, allowed):
    """A value outside a Literal names the field and lists every allowed choice."""
    with raises(f"{cls._prefix}.{field}", "choose one of", allowed):
        cls(**{field: "bogus"})


def test_bad_expert_init_choice():
    with raises("moe.expert_init", "diverse"):
        moe(expert_init="uniform")


def test_topk_before_softmax_needs_softmax():
    with raises("topk_before_softmax", "score='softmax'"):
        RouterConfig(score="sigmoid", topk_before_softmax=True)


# ----------------------------------------------------------------------------- bad tensors


def test_wrong_input_width():
    """x whose last dim is not d_model names the input and the allowed shape."""
    layer = moelab.MoELayer(moe())
    with raises("input x", r"d_model=8", "allowed"):
        layer(torch.randn(3, 5))


@pytest.mark.parametrize("arg", ["mask", "token_ids"])
def test_wrong_mask_or_token_id_shape(arg):
    """mask / token_ids must have x's leading shape."""
    layer = moelab.MoELayer(moe(router=RouterConfig(method="hash")))
    x = torch.randn(2, 3, 8)
    bad = torch.ones(2, 4, dtype=torch.bool if arg == "mask" else torch.int64)
    kw = {"token_ids": torch.zeros(2, 3, dtype=torch.int64), arg: bad}
    with raises(arg, r"\(2, 3\)", "allowed"):
        layer(x, **kw)


def test_integer_input_is_rejected():
    layer = moelab.MoELayer(moe())
    with raises("dtype", "floating"):
        layer(torch.ones(3, 8, dtype=torch.int64))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_router_logits(bad):
    """A NaN / inf input gives non-finite router logits: ValueError saying finite is allowed."""
    layer = moelab.MoELayer(moe())
    x = torch.randn(4, 8)
    x[1, 2] = bad
    with raises("router logits", "allowed: finite"):
        layer(x)


# ----------------------------------------------------------------------------- dict / TOML


def test_unknown_key_suggests_the_closest_name():
    """A misspelt key names the full path and suggests the closest valid key."""
    with raises("unknown setting 'num_expert'", "did you mean 'num_experts'"):
        from_dict(MoEConfig, {**SIZES, "num_expert": 4})


def test_unknown_nested_key_names_its_section():
    with raises("'router.metod'", "did you mean 'router.method'"):
        from_dict(MoEConfig, {**SIZES, "router": {"metod": "topk"}})


def test_unknown_key_in_a_toml_file(tmp_path):
    """The same check applies to a TOML file's tables."""
    path = tmp_path / "moe.toml"
    path.write_text(
        "d_model = 8\nnum_experts = 4\ntop_k = 2\nd_expert = 6\n[balance]\naux_coeff = 0.01\n"
    )
    with raises("balance.aux_coeff", "did you mean 'balance.aux_coef'"):
        from_dict(MoEConfig, load_toml(path))


def test_missing_required_setting():
    with raises("missing", "d_expert"):
        from_dict(MoEConfig, {"d_model": 8, "num_experts": 4, "top_k": 2})


def test_bad_value_inside_a_dict_is_still_validated():
    with raises("router.score", "choose one of"):
        from_dict(MoEConfig, {**SIZES, "router": {"score": "tanh"}})


def test_from_dict_round_trip():
    """to_dict -> from_dict gives back an equal config, nested sections included."""
    cfg = moe(
        num_shared=1,
        router=RouterConfig(method="sinkhorn", score="sigmoid", num_groups=2),
        balance=BalanceConfig(aux_coef=0.01, aux_scope="global", bias_rate=1e-3),
        capacity=CapacityConfig(factor=1.25, eval_factor=2.0, policy="position", reroute=True),
    )
    assert from_dict(MoEConfig, to_dict(cfg)) == cfg


def test_apply_overrides_round_trip():
    """--set style overrides reach nested fields, are parsed as TOML values and validated."""
    base = to_dict(moe())
    data = apply_overrides(
        base, ["top_k=1", "router.score=sigmoid", "balance.aux_coef=0.5", "capacity.reroute=true"]
    )
    cfg = from_dict(MoEConfig, data)
    assert cfg.top_k == 1 and cfg.router.score == "sigmoid"
    assert cfg.balance.aux_coef == 0.5 and cfg.capacity.reroute is True
    assert base["top_k"] == 2  # the input dict is not modified
    with raises("moe.top_k"):
        from_dict(MoEConfig, apply_overrides(base, ["top_k=9"]))
    with raises("key=value"):
        apply_overrides(base, ["top_k"])


def test_int_is_accepted_for_float_fields():
    cfg = from_dict(MoEConfig, {**SIZES, "capacity": {"factor": 2}})
    assert isinstance(cfg.capacity.factor, float)


def test_a_runs_config_json_is_a_config_source(tmp_path):
    """`moelab train --config RUN/config.json` rebuilds exactly the run's config; a broken
    JSON file gets an error naming the file."""
    import json

    from moelab.runconfig import build_config, load_config_dict

    cfg = build_config(load_config_dict("tiny"), ["model.moe.balance.bias_rate=0.001"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(to_dict(cfg)))
    assert build_config(load_config_dict(str(path))) == cfg
    path.write_text("{not json")
    with raises("config.json", "not valid JSON"):
        load_config_dict(str(path))


def test_top1_with_renormalised_gates_warns():
    """k = 1 with normalize=true: the gate weight is exactly 1 and the router gets no LM
    gradient, so building the config warns; normalize=false (Switch's p_i) does not."""
    import warnings

    from moelab.config import MoEConfig, RouterConfig, TopOneGateWarning

    with pytest.warns(TopOneGateWarning, match="no gradient from the LM loss"):
        MoEConfig(d_model=8, num_experts=4, top_k=1, d_expert=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoEConfig(d_model=8, num_experts=4, top_k=1, d_expert=8,
                  router=RouterConfig(normalize=False))  # fmt: skip
        MoEConfig(d_model=8, num_experts=4, top_k=2, d_expert=8)
