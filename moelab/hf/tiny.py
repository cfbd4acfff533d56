"""Tiny random transformers configs of the supported MoE families, for tests and benchmarks.

Nothing is downloaded: ``AutoModelForCausalLM.from_config(tiny_config("mixtral"))`` builds a
random model in memory; ``save_pretrained`` it to try ``moelab profile`` offline.
"""

from __future__ import annotations

from typing import Any

KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama")


def tiny_config(
    kind: str,
    *,
    layers: int = 2,
    hidden: int = 32,
    experts: int = 8,
    top_k: int = 2,
    vocab: int = 128,
    max_len: int = 256,
) -> Any:
    """A small config of ``kind`` (one of :data:`KINDS`; ``llama`` is dense, for errors).

    DeepSeek-V3 gets one extra leading dense layer (``first_k_dense_replace=1``) and 4 expert
    groups of which each token may use 2, so its group-limited routing is exercised.
    """
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
    )
    moe = dict(num_experts=experts, num_experts_per_tok=top_k)
    if kind == "mixtral":
        return transformers.MixtralConfig(
            **common, num_local_experts=experts, num_experts_per_tok=top_k
        )
    if kind == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, **moe, moe_intermediate_size=hidden // 2,
            shared_expert_intermediate_size=hidden, norm_topk_prob=True,
        )  # fmt: skip
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, **moe, moe_intermediate_size=hidden // 2, head_dim=hidden // 4
        )
    if kind == "olmoe":
        return transformers.OlmoeConfig(**common, **moe)
    if kind == "deepseek_v3":
        common.update(num_hidden_layers=layers + 1, num_key_value_heads=4)
        return transformers.DeepseekV3Config(
            **common, moe_intermediate_size=hidden // 2, n_routed_experts=experts,
            n_shared_experts=1, num_experts_per_tok=top_k, n_group=4, topk_group=2,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8,
        )  # fmt: skip
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    raise ValueError(f"kind={kind!r} is not allowed; choose one of {list(KINDS)}")


# ----------------------------------------------------------------------------- every family

# Config fields shrunk wherever a family's config has them (hidden 32, 2 layers, 8 experts, top-2).
SIZES: dict[str, int] = {
    "hidden_size": 32, "d_model": 32, "intermediate_size": 64, "ffn_dim": 64, "d_ff": 64,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
    "expert_ffn_hidden_size": 16, "ffn_hidden_size": 64, "moe_shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "intermediate_size_mlp": 64, "share_expert_dim": 32,
    "shared_intermediate_size": 32, "moe_hidden_size": 16, "router_hidden_size": 16,
    "num_hidden_layers": 2, "num_layers": 2, "encoder_layers": 1, "decoder_layers": 1,
    "num_decoder_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
    "num_heads": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4, "d_kv": 8,
    "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "vocab_size": 128, "max_position_embeddings": 128,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "top_k_experts": 2, "moe_topk": 2, "moe_k": 2, "moe_top_k": 2,
    "n_group": 2, "topk_group": 1, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1, "first_k_dense_replace": 1,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1,
    "mamba_d_state": 8, "encoder_sparse_step": 1, "decoder_sparse_step": 1,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
    "linear_value_head_dim": 8, "zero_expert_num": 2, "text_hidden_size": 32,
    "index_head_dim": 8, "index_n_heads": 2, "adapter_in_dim": 32,
    "adapter_input_size": 32,
    "num_sliding_attention_heads": 4, "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 8,
}  # fmt: skip
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")

# What the generic shrink gets wrong for a family: extra config keyword arguments (a table).
OVERRIDES: dict[str, dict[str, Any]] = {
    "zaya": {"num_experts_per_tok": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "gemma4_text": {"enable_moe_block": True},
    "diffusion_gemma_text": {"enable_moe_block": True},
    "llama4_text": {"moe_layers": [0, 1]},
    "switch_transformers": {"num_sparse_encoder_layers": 1, "num_sparse_decoder_layers": 1},
    "flint": {"mlp_only_layers": []},
    "mistral_large4_text": {"kv_source_layers": None},
    "step3p5": {"sliding_window": 8},
    "glm4v_moe_text": {
        "head_dim": 16,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
        },
    },
    "hy_v4": {"indexer_types": ["full", "shared"]},
    "hy_v4_vl_text": {
        "indexer_types": ["full", "shared"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
        },
    },
    "glm5_next_text": {"qk_rope_head_dim": 0, "head_dim": 0},
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 8,
        "indexer_compress_ratio": 4,
    },
    "ernie4_5_vl_moe_text": {
        "head_dim": 16,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 500000.0,
            "mrope_section": [2, 2, 4],
        },
    },
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"]},
    "mimo_v2_flash": {"num_key_value_heads": 2},
    # save_pretrained's weight conversion pads the embedding to a real vocabulary (~200k rows)
    "inkling2_text": {"vocab_size": 200064},
    "inkling2_loop_text": {"vocab_size": 200064},
    "muse_spark_text": {"num_hidden_layers": 4, "hidden_sizes": [32, 32, 32, 32]},
}


def _shrunk(name: str, value: Any, layers: int | None, keep: int) -> tuple[bool, Any]:
    """(changed?, new value) of one config field under the generic shrink."""
    import transformers

    if name in SIZES and (value is None or isinstance(value, int)) and not isinstance(value, bool):
        return name != "q_lora_rank" or value is not None, SIZES[name]
    if name in TOKEN_FIELDS and isinstance(value, int) and value >= SIZES["vocab_size"]:
        return True, 0
    if isinstance(value, list) and layers and len(value) == layers:
        return True, value[-keep:]  # later layers are the MoE ones
    if isinstance(value, transformers.PreTrainedConfig):
        return True, shrink_config(type(value))
    return False, value


def shrink_config(cls: type, extra: dict[str, Any] | None = None) -> Any:
    """A tiny instance of the transformers config class ``cls`` (a dataclass in transformers 5):
    every field of :data:`SIZES` shrunk, per-layer lists cut to the last layers, sub-configs
    shrunk too, then ``OVERRIDES[model_type]`` and ``extra``."""
    import dataclasses

    base = cls()
    values = vars(base)  # not getattr: per-layer attributes refuse a global read
    layers = values.get("num_hidden_layers")
    kw: dict[str, Any] = {}
    alias = {v: k for k, v in getattr(cls, "attribute_map", {}).items()}  # field -> common name
    extra_kw = {**OVERRIDES.get(getattr(cls, "model_type", ""), {}), **(extra or {})}
    keep = extra_kw.get("num_hidden_layers", SIZES["num_hidden_layers"])
    for f in dataclasses.fields(cls):
        name = f.name if f.name in SIZES else alias.get(f.name, f.name)
        changed, new = _shrunk(name, values.get(f.name), layers, keep)
        if changed:
            kw[f.name] = new
    kw.update(extra_kw)
    return cls(**kw)


def _has_experts(cls: type) -> bool:
    import dataclasses

    return dataclasses.is_dataclass(cls) and any(
        "expert" in f.name for f in dataclasses.fields(cls)
    )


def moe_families() -> list[str]:
    """Model types of the installed transformers whose config (or its text sub-config) has
    expert fields, a model class in an auto mapping, and a text path; a ``*_text`` type whose
    parent is listed counts once, as the parent."""
    import transformers
    from transformers.models.auto import modeling_auto

    names = [n for n in dir(modeling_auto) if n.startswith("MODEL_") and n.endswith("_NAMES")]
    mapped = {mt for n in names for mt in getattr(modeling_auto, n)}
    out = []
    for mt, cls in sorted(transformers.CONFIG_MAPPING.items()):
        if mt not in mapped or mt in NOT_TEXT:
            continue
        subs = [getattr(cls, "sub_configs", {}).get("text_config")]
        if _has_experts(cls) or any(s is not None and _has_experts(s) for s in subs):
            out.append(mt)
    parents = {mt.removesuffix("_text") for mt in out}
    return [
        mt
        for mt in out
        if not (mt.endswith("_text") and mt.removesuffix("_text") in parents - {mt})
    ]


NOT_TEXT = ("vitpose", "vitpose_backbone", "dots3_note_vision_encoder")
TEXT_CLASSES = ("ForCausalLM", "ForConditionalGeneration", "Model")
TEXT_MAPPINGS = ("FOR_CAUSAL_LM_", "FOR_SEQ_TO_SEQ_CAUSAL_LM_", "FOR_IMAGE_TEXT_TO_TEXT_", "")


def text_model_class(model_type: str) -> tuple[type, Any]:
    """(model class, tiny config) of a family's text path: its text sub-config's causal LM
    (else its base model) when it has one, else the family's own class."""
    import transformers

    cls = transformers.CONFIG_MAPPING[model_type]
    text_cls = getattr(cls, "sub_configs", {}).get("text_config")
    if text_cls is not None and _has_experts(text_cls):  # the text decoder alone, no vision
        text = shrink_config(text_cls)
        if _auto_class(text) is not None:
            return _auto_class(text), text
    config = shrink_config(cls)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in [text, config] if text is not config else [config]:
        model_cls = _auto_class(cfg)
        if model_cls is not None:
            return model_cls, cfg
    raise ValueError(f"{model_type}: no model class in transformers' auto mappings")


def _auto_class(config: Any) -> type | None:
    """The model class of ``config``: an auto-mapped class built for its config class, else the
    first auto-mapped one (a type served by another family's code, Sarvam by DeepSeek-V3),
    else a ``*ForCausalLM`` / ``*Model`` of its modeling module (text sub-configs)."""
    import importlib

    import transformers
    from transformers.models.auto import modeling_auto as ma

    mapped = []
    for mapping in TEXT_MAPPINGS:
        name = getattr(ma, f"MODEL_{mapping}MAPPING_NAMES").get(config.model_type)
        cls = getattr(transformers, name, None) if name else None
        if cls is not None:
            mapped.append(cls)
    exact = [c for c in mapped if getattr(c, "config_class", None) is type(config)]
    if exact or mapped:
        return (exact or mapped)[0]
    try:
        module = importlib.import_module(
            type(config).__module__.replace("configuration_", "modeling_")
        )
    except ImportError:
        return None
    for suffix in TEXT_CLASSES:  # a text sub-config no auto mapping lists
        for name in dir(module):
            obj = getattr(module, name)
            if name.endswith(suffix) and getattr(obj, "config_class", None) is type(config):
                return obj
    return None


def family_model(model_type: str, seed: int = 0) -> Any:
    """A tiny random model of a family's text path, in eval mode (see :func:`shrink_config`)."""
    import torch

    model_cls, config = text_model_class(model_type)
    torch.manual_seed(seed)
    return model_cls._from_config(config).eval()
