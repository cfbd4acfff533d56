"""``moelab export``: a trained moelab LM as a transformers model (``save_pretrained`` folder).

An MoE :class:`moelab.model.MoELM` becomes ``MixtralForCausalLM``; a dense one (``model.moe``
unset) becomes ``LlamaForCausalLM``. The architectures match term for term: pre-norm blocks with
RMSNorm (eps 1e-6), rotate-half RoPE (``rope_theta``), causal multi-head attention without
biases (``num_key_value_heads = num_attention_heads``), SwiGLU FFNs, a final RMSNorm and a
(tied or untied) LM head. Mixtral's router computes softmax over all E, top-k, renormalise,
which is moelab's ``router.score="softmax"`` with ``normalize=True`` or
``topk_before_softmax=True`` (softmax over the k chosen logits is the same number).

Weight layout (transformers 5 stores Mixtral's experts as fused 3-D parameters and applies
``F.linear(x, W)``, i.e. ``x @ W.T``):

- ``qkv.weight`` (3D, D) rows ``[q | k | v]`` -> ``q_proj`` / ``k_proj`` / ``v_proj``;
- ``experts.w13_ED2F`` (E, D, 2F) ``[gate | up]`` -> ``experts.gate_up_proj`` (E, 2F, D);
- ``experts.w2_EFD`` (E, F, D) -> ``experts.down_proj`` (E, D, F);
- ``router.weight`` (E, D) -> ``mlp.gate.weight``; dense ``w13_D2F`` / ``w2_FD`` ->
  ``gate_proj`` / ``up_proj`` / ``down_proj``.

What Mixtral cannot express is refused with one line naming every difference
(:func:`export_problems`). Weights are exported in fp32 (the router is fp32 in moelab).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.model import DenseFFN, MoELM
from moelab.moe import MoELayer

RMS_EPS = 1e-6  # moelab.model.RMSNorm's eps
VERIFY_TOKENS = 16  # tokens in the post-conversion logits check


# ----------------------------------------------------------------------------- checks


def export_problems(model: MoELM) -> list[str]:
    """What in ``model`` transformers' Mixtral (or Llama, for a dense model) cannot express.

    Empty when the model can be exported exactly. Training-only options (router noise, expert
    masking, soft warm-up, expert dropout, balance losses) do not matter: export is inference.
    """
    cfg = model.cfg
    if cfg.moe is None:
        return []  # dense: LlamaForCausalLM expresses every dense moelab model
    problems: list[str] = []
    dense = [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]
    if dense:
        problems.append(
            f"dense FFN layers {dense} among the MoE layers (model.first_dense="
            f"{cfg.first_dense}, model.moe_every={cfg.moe_every}); Mixtral has an MoE FFN in "
            "every layer"
        )
    return problems + _router_problems(cfg.moe.router) + _moe_problems(cfg.moe, model)


def _router_problems(r) -> list[str]:
    """Router settings Mixtral's plain softmax top-k linear gate cannot express."""
    problems: list[str] = []
    if r.method != "topk":
        problems.append(f"router.method={r.method!r}; Mixtral routes by token-choice top-k only")
    if r.score != "softmax":
        problems.append(f"router.score={r.score!r}; Mixtral scores experts with a softmax")
    if not r.normalize and not r.topk_before_softmax:
        problems.append(
            "router.normalize=False; Mixtral always renormalises the top-k weights to sum to 1"
        )
    for name, value, off in (
        ("gate_bias", r.gate_bias, False),
        ("logit_softcap", r.logit_softcap, 0.0),
        ("input_norm", r.input_norm, "none"),
        ("expert_scale", r.expert_scale, False),
    ):
        if value != off:
            problems.append(f"router.{name}={value!r}; Mixtral's router is a plain linear gate")
    if r.num_groups > 1 and r.topk_groups < r.num_groups:
        problems.append(
            f"group-limited routing (router.num_groups={r.num_groups}, router.topk_groups="
            f"{r.topk_groups}); Mixtral picks the top-k over all experts"
        )
    return problems


def _moe_problems(m, model: MoELM) -> list[str]:
    """MoE-layer features (null, hash, shared experts, inference dropping, a live selection
    bias) that Mixtral has no counterpart for."""
    problems: list[str] = []
    if m.null_experts:
        problems.append(f"moe.null_experts={m.null_experts}; Mixtral has no null experts")
    if m.hash_layers:
        problems.append(f"moe.hash_layers={m.hash_layers}; Mixtral has no hash-routed layers")
    if m.num_shared:
        problems.append(
            f"{m.num_shared} shared expert(s) (moe.num_shared); Mixtral has no shared experts"
        )
    if m.capacity.factor_for(training=False) > 0:
        problems.append(
            f"token dropping at inference (capacity factor "
            f"{m.capacity.factor_for(training=False)}); Mixtral is dropless: set "
            "capacity.eval_factor=0"
        )
    biased = [
        i
        for i, layer in enumerate(model.moe_layers)
        if layer.balancer.bias_on and bool(layer.balancer.bias.abs().max() > 0)
    ]
    if biased:
        problems.append(
            f"a non-zero loss-free selection bias in MoE layers {biased}; Mixtral has no "
            "selection bias (DeepSeek-V3's e_score_correction_bias has one, but V3 uses MLA "
            "attention and sigmoid scores, so it is no target for this model)"
        )
    return problems


def check_exportable(model: MoELM) -> None:
    """Raise a one-line ValueError listing every difference :func:`export_problems` finds."""
    problems = export_problems(model)
    if problems:
        raise ValueError("cannot export to transformers MixtralForCausalLM: " + "; ".join(problems))


# ----------------------------------------------------------------------------- conversion


def hf_config(model: MoELM, *, eos_token_id: int | None = None) -> Any:
    """The ``MixtralConfig`` (MoE) or ``LlamaConfig`` (dense) describing ``model``."""
    from transformers import LlamaConfig, MixtralConfig

    cfg = model.cfg
    common: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=RMS_EPS,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_dropout=0.0,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        dtype="float32",
    )
    if cfg.moe is None:
        return LlamaConfig(
            intermediate_size=cfg.dense_hidden,
            attention_bias=False,
            mlp_bias=False,
            **common,
        )
    m = cfg.moe
    return MixtralConfig(
        intermediate_size=m.d_expert,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        sliding_window=None,
        router_aux_loss_coef=0.0,
        router_jitter_noise=0.0,
        output_router_logits=False,
        **common,
    )


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()


@torch.no_grad()
def convert_state_dict(model: MoELM) -> dict[str, Tensor]:
    """moelab parameter names/layouts -> transformers Mixtral (or Llama) ones, fp32."""
    D = model.cfg.d_model
    sd: dict[str, Tensor] = {
        "model.embed_tokens.weight": _f32(model.embed.weight),
        "model.norm.weight": _f32(model.norm.weight),
        "lm_head.weight": _f32(model.head.weight),
    }
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = _f32(block.norm1.weight)
        sd[p + "post_attention_layernorm.weight"] = _f32(block.norm2.weight)
        q, k, v = block.attn.qkv.weight.split(D, dim=0)  # view(B, L, 3, H, Dh): [q | k | v]
        sd[p + "self_attn.q_proj.weight"] = _f32(q)
        sd[p + "self_attn.k_proj.weight"] = _f32(k)
        sd[p + "self_attn.v_proj.weight"] = _f32(v)
        sd[p + "self_attn.o_proj.weight"] = _f32(block.attn.proj.weight)
        ffn = block.ffn
        if isinstance(ffn, MoELayer):
            sd[p + "mlp.gate.weight"] = _f32(ffn.router.weight)
            # F.linear(x, W[e]) = x @ W[e].T: (E, D, 2F) -> (E, 2F, D), (E, F, D) -> (E, D, F)
            sd[p + "mlp.experts.gate_up_proj"] = _f32(ffn.experts.w13_ED2F.transpose(1, 2))
            sd[p + "mlp.experts.down_proj"] = _f32(ffn.experts.w2_EFD.transpose(1, 2))
        elif isinstance(ffn, DenseFFN):
            gate_DF, up_DF = ffn.w13_D2F.chunk(2, dim=-1)
            sd[p + "mlp.gate_proj.weight"] = _f32(gate_DF.T)
            sd[p + "mlp.up_proj.weight"] = _f32(up_DF.T)
            sd[p + "mlp.down_proj.weight"] = _f32(ffn.w2_FD.T)
        else:  # pragma: no cover - MoELM builds only these two
            raise ValueError(f"layer {i}: unknown FFN {type(ffn).__name__}")
    return sd


def to_hf(model: MoELM, *, eos_token_id: int | None = None) -> nn.Module:
    """The transformers model (fp32, eval mode) computing the same function as ``model``.

    Raises a one-line ValueError when the architecture cannot be expressed.
    """
    check_exportable(model)
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    config = hf_config(model, eos_token_id=eos_token_id)
    cls = MixtralForCausalLM if model.cfg.moe is not None else LlamaForCausalLM
    hf = cls(config).float()
    missing, unexpected = hf.load_state_dict(convert_state_dict(model), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(
            f"weight names do not match {cls.__name__} (transformers layout changed?): missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


@torch.no_grad()
def logit_diff(model: MoELM, hf: nn.Module, tokens_BL: Tensor) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) of the moelab model and its export on
    ``tokens_BL``, both in eval mode (the moelab model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        ours = model(tokens_BL).logits.float()
    finally:
        model.train(was_training)
    theirs = hf(input_ids=tokens_BL).logits.float()
    return float((ours - theirs).abs().max()), float(ours.abs().max())


def _verify(model: MoELM, hf: nn.Module) -> None:
    """Refuse to write an export whose logits differ from the moelab model's."""
    L = min(VERIFY_TOKENS, model.cfg.max_seq_len)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, L), generator=gen)
    device = next(model.parameters()).device
    diff, scale = logit_diff(model, hf.to(device), tokens.to(device))
    if not diff <= 1e-4 * max(1.0, scale):
        raise ValueError(
            f"exported {type(hf).__name__} logits differ from the moelab model's by {diff:.3g} "
            "(max |difference|); please report this"
        )


# ----------------------------------------------------------------------------- entry point


def export_to_hf(model_or_run_folder: Any, out_dir: str | Path, *, verify: bool = True) -> Path:
    """Write ``model_or_run_folder`` as a transformers model to ``out_dir``; returns ``out_dir``.

    model_or_run_folder: a :class:`MoELM`, a :class:`moelab.inspect.TrainedRun`, or a run folder
    / ``ckpt-*.pt`` file (loaded with :func:`moelab.inspect.load_trained`; the run's tokenizer is
    then saved too, as a ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as bos/eos).
    verify: compare the logits of the converted model with moelab's on 16 random tokens first.

    The folder loads with ``AutoModelForCausalLM.from_pretrained(out_dir)``
    (``MixtralForCausalLM``; ``LlamaForCausalLM`` for a dense model). A model Mixtral cannot
    express raises a one-line ValueError naming every difference (see :func:`export_problems`).
    """
    from moelab.inspect import TrainedRun, load_trained

    run = model_or_run_folder
    if isinstance(run, (str, Path)):
        run = load_trained(run)
    if isinstance(run, TrainedRun):
        model, corpus = run.model, run.corpus
    elif isinstance(run, MoELM):
        model, corpus = run, None
    else:
        raise ValueError(
            f"cannot export a {type(run).__name__}; allowed: a moelab MoELM, a TrainedRun, or a "
            "run folder / checkpoint path"
        )
    eos = corpus.eot_id if corpus is not None else None
    hf = to_hf(model, eos_token_id=eos)
    if verify:
        _verify(model, hf)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.cpu().save_pretrained(out)
    if corpus is not None:
        from transformers import PreTrainedTokenizerFast

        from moelab.data import EOT

        tok = PreTrainedTokenizerFast(
            tokenizer_object=corpus.tokenizer,
            bos_token=EOT,
            eos_token=EOT,
            model_max_length=model.cfg.max_seq_len,
        )
        tok.save_pretrained(out)
    return out


def export_run(run: str, out: str, *, verify: bool = True) -> str:
    """``moelab export``: a run folder or checkpoint -> ``out`` (checked first); returns the
    one summary line (step, parameters, architecture, folder)."""
    from transformers.utils import logging as hf_logging

    from moelab.inspect import load_trained
    from moelab.runfolder import check_model_folder

    hf_logging.disable_progress_bar()  # keep the CLI's output to the one summary line
    check_model_folder(out, "export")
    trained = load_trained(run)
    path = export_to_hf(trained, out, verify=verify)
    arch = "MixtralForCausalLM" if trained.model.cfg.moe is not None else "LlamaForCausalLM"
    n = sum(p.numel() for p in trained.model.parameters())
    return f"exported step {trained.step} ({n} parameters) as {arch} -> {path}"
