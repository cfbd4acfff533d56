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
