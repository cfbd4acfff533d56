"""``moelab export``: a moelab LM as a transformers model computes the same logits and routing.

Tiny random models (d_model 32, 2 layers, 2 heads, E=4, k=2, d_expert 16, vocab 64), every
weight randomised (RMSNorm gains and the router included) so that a wrong layout shows up.
Shape legend: B sequences, L sequence length, T tokens, K top-k.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab.config import BalanceConfig, CapacityConfig, MoEConfig, RouterConfig  # noqa: E402
from moelab.hf import capture_routing, export_problems, export_to_hf, find_routers  # noqa: E402
from moelab.model import ModelConfig, MoELM  # noqa: E402

MICRO = str(Path(__file__).parent / "fixtures" / "micro.toml")
V, D, E, K = 64, 32, 4, 2


def tiny_cfg(*, moe: bool = True, tie: bool = True, **router) -> ModelConfig:
    m = MoEConfig(d_model=D, num_experts=E, top_k=K, d_expert=16, router=RouterConfig(**router))
    return ModelConfig(
        d_model=D,
        n_layers=2,
        n_heads=2,
        max_seq_len=32,
        vocab_size=V,
        tie_embeddings=tie,
        rope_theta=500.0,
        moe=m if moe else None,
        d_ff=24,
    )


def random_model(cfg: ModelConfig, seed: int = 0) -> MoELM:
    """Every parameter random: matrices N(0, 0.3²), RMSNorm gains U(0.5, 1.5), router N(0, 1)."""
    torch.manual_seed(seed)
    model = MoELM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.0 if name.endswith("router.weight") else 0.3)
    return model


def tokens(B: int = 3, L: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "variant, arch",
    [
        ("tied", "MixtralForCausalLM"),
        ("untied+topk_before_softmax", "MixtralForCausalLM"),
        ("dense", "LlamaForCausalLM"),
    ],
)
def test_export_matches_logits_and_routing(tmp_path, variant, arch):
    """The reloaded export gives moelab's logits (fp32, atol 1e-5) and its routers pick the
    same experts per token and layer."""
    cfg = {
        "tied": tiny_cfg(),
        "untied+topk_before_softmax": tiny_cfg(tie=False, topk_before_softmax=True),
        "dense": tiny_cfg(moe=False),
    }[variant]
    model = random_model(cfg)
    out = export_to_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    assert hf.config.tie_word_embeddings == cfg.tie_embeddings
    assert next(hf.parameters()).dtype == torch.float32
    x = tokens()
    with torch.no_grad():
        ours = model(x)
        if cfg.moe is None:
            theirs = hf(input_ids=x)
            chosen = []
        else:
            sites = find_routers(hf)
            chosen: list[torch.Tensor] = []
            with capture_routing(sites, lambda i, logits, experts: chosen.append(experts)):
                theirs = hf(input_ids=x)
    assert ours.logits.abs().max() > 1.0  # not a trivial near-zero model
    torch.testing.assert_close(theirs.logits, ours.logits, atol=1e-5, rtol=1e-5)
    assert len(chosen) == len(ours.moe)
    for experts_TK, moe_out in zip(chosen, ours.moe, strict=True):
        assert torch.equal(experts_TK.sort(-1).values, moe_out.experts.sort(-1).values)
    if chosen:  # the routing is not degenerate: several experts are used in each layer
        assert all(len(e.unique()) >= 3 for e in chosen)


def test_zero_loss_free_bias_exports(tmp_path):
    """bias_rate > 0 with a still-zero bias routes exactly like Mixtral: no refusal."""
    cfg = tiny_cfg()
    cfg = dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, balance=BalanceConfig(bias_rate=1e-3))
    )
    assert export_problems(random_model(cfg)) == []


def _with_moe(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **changes))


REFUSALS = {
    "sigmoid": (lambda: tiny_cfg(score="sigmoid"), "router.score='sigmoid'"),
    "no-normalize": (lambda: tiny_cfg(normalize=False), "router.normalize=False"),
    "expert-choice": (lambda: tiny_cfg(method="expert_choice"), "router.method='expert_choice'"),
    "groups": (lambda: tiny_cfg(num_groups=2, topk_groups=1), "group-limited routing"),
    "shared": (lambda: _with_moe(tiny_cfg(), num_shared=1), "shared expert"),
    "first-dense": (
        lambda: dataclasses.replace(tiny_cfg(), first_dense=1),
        "dense FFN layers [0]",
    ),
    "moe-every": (
        lambda: dataclasses.replace(tiny_cfg(), moe_every=2),
        "dense FFN layers [1]",
    ),
    "capacity": (
        lambda: _with_moe(tiny_cfg(), capacity=CapacityConfig(factor=1.0)),
        "token dropping",
    ),
    "gate-bias": (lambda: tiny_cfg(gate_bias=True), "router.gate_bias=True"),
    "softcap": (lambda: tiny_cfg(logit_softcap=2.0), "router.logit_softcap=2.0"),
    "rms-router": (lambda: tiny_cfg(input_norm="rms"), "router.input_norm='rms'"),
    "expert-scale": (lambda: tiny_cfg(expert_scale=True), "router.expert_scale=True"),
    "hash-layers": (lambda: _with_moe(tiny_cfg(), hash_layers=1), "moe.hash_layers=1"),
    "null-experts": (lambda: _with_moe(tiny_cfg(), null_experts=2), "moe.null_experts=2"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusals_name_the_difference(tmp_path, name):
    """Each architecture Mixtral cannot express is refused in one line naming it; nothing is
    written."""
    make, phrase = REFUSALS[name]
    model = random_model(make())
    with pytest.raises(ValueError) as info:
        export_to_hf(model, tmp_path / "hf")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("cannot export to transformers")
    assert phrase in msg
    assert not (tmp_path / "hf").exists()


def test_refusal_lists_every_difference():
    """A non-zero loss-free bias, sigmoid scores and shared experts together: one line, all
    three named (the bias with the layers that carry it and why DeepSeek-V3 is no target)."""
    cfg = _with_moe(tiny_cfg(score="sigmoid"), num_shared=1, balance=BalanceConfig(bias_rate=1e-3))
    model = random_model(cfg)
    with torch.no_grad():
        model.moe_layers[1].bias.copy_(torch.tensor([0.1, -0.1, 0.0, 0.0]))
    with pytest.raises(ValueError) as info:
        export_to_hf(model, "unused")
    msg = str(info.value)
    assert "\n" not in msg
    for phrase in (
        "router.score='sigmoid'",
        "shared expert",
        "loss-free selection bias in MoE layers [1]",
        "DeepSeek-V3",
    ):
        assert phrase in msg


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moelab", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )


@pytest.mark.slow
def test_cli_export_of_a_trained_run(tmp_path):
    """``moelab train`` (micro config, tied embeddings, 2 steps) then ``moelab export RUN --out
    DIR``: the folder loads with Auto classes, its tokenizer encodes like the run's, and its
    logits equal the checkpoint's. A missing run is a one-line error."""
    run_dir, out = tmp_path / "run", tmp_path / "hf"
    train = ["train", "--config", MICRO, "--out", str(run_dir), "--max-steps", "2", "--quiet"]
    proc = _cli(*train, "--set", "train.eval_every=0")
    assert proc.returncode == 0, proc.stderr
    proc = _cli("export", str(run_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "MixtralForCausalLM" in proc.stdout

    from moelab.inspect import load_trained

    trained = load_trained(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "In the beginning God created the heaven and the earth."
    ids = trained.corpus.encode(text)
    assert tok(text)["input_ids"] == ids
    assert tok.eos_token_id == trained.corpus.eot_id == hf.config.eos_token_id
    assert hf.config.tie_word_embeddings
    x = torch.tensor([ids[:32]])
    with torch.no_grad():
        torch.testing.assert_close(
            hf(input_ids=x).logits, trained.model(x).logits, atol=1e-5, rtol=1e-5
        )

    bad = _cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moelab export: error:"), bad.stderr
