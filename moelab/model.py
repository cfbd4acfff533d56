"""Decoder-only MoE language model: RMSNorm -> RoPE attention -> MoE (or dense) SwiGLU FFN.

Legend: B sequences, L sequence length, D model dim, H heads, Dh head dim, V vocab, T = B·L.

Classes in forward order (nanoGPT): RMSNorm, rotary helpers, Attention, DenseFFN, Block, MoELM.
Per-layer balance losses are averaged over the MoE layers (each computed from its own
layer's routing, not pooled over layers; transformers #28255).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moelab.config import MoEConfig, _check_literals, check_range
from moelab.experts import swiglu
from moelab.moe import MoELayer, MoEOutput


@dataclass(frozen=True)
class ModelConfig:
    """A tiny decoder-only LM.

    moe: the MoE FFN (``d_model`` is filled in from this config); ``None`` = dense model.
    moe_every: an MoE FFN in every ``moe_every``-th layer (1 = all, 2 = every other).
    first_dense: the first n layers are dense (DeepSeek style).
    d_ff: hidden size of dense FFNs; 0 = the MoE's active hidden size
        (top_k·d_expert + num_shared·d_shared), i.e. the dense model with the same active
        parameters per token.
    vocab_size: 0 = take it from the tokenizer.
    """

    _prefix = "model"

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 1024
    vocab_size: int = 0
    d_ff: int = 0
    moe_every: int = 1
    first_dense: int = 0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    init_std: float = 0.02
    moe: MoEConfig | None = field(
        default_factory=lambda: MoEConfig(d_model=128, num_experts=16, top_k=2, d_expert=256)
    )

    def __post_init__(self) -> None:
        _check_literals(self)
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "moe_every"):
            check_range(f"model.{name}", getattr(self, name), lo=1)
        for name in ("vocab_size", "d_ff", "first_dense"):
            check_range(f"model.{name}", getattr(self, name), lo=0)
        check_range("model.init_std", self.init_std, lo=0)
        check_range("model.rope_theta", self.rope_theta, lo=0, lo_open=True)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("model.d_model / model.n_heads must be even (rotary embeddings)")
        if self.moe is not None:
            self.moe.check_bias_applies()
        if self.moe is not None and self.moe.d_model != self.d_model:
            raise ValueError(
                f"model.moe.d_model={self.moe.d_model} differs from model.d_model="
                f"{self.d_model}; leave model.moe.d_model unset"
            )

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i has an MoE FFN."""
        return (
            self.moe is not None
            and i >= self.first_dense
            and (i - self.first_dense) % self.moe_every == 0
        )

    def moe_config(self, i: int) -> MoEConfig | None:
        """The MoE config of layer i (None for a dense layer); the first ``moe.hash_layers``
        MoE layers get :meth:`MoEConfig.hash_layer`."""
        if not self.is_moe_layer(i):
            return None
        j = sum(self.is_moe_layer(n) for n in range(i))  # index among the MoE layers
        return self.moe.hash_layer() if j < self.moe.hash_layers else self.moe

    @property
    def dense_hidden(self) -> int:
        """Hidden size of dense FFNs (same active parameters as the MoE FFN by default)."""
        if self.d_ff:
            return self.d_ff
        if self.moe is None:
            return 4 * self.d_model
        m = self.moe
        return m.top_k * m.d_expert + m.num_shared * m.shared_hidden

    def dense_twin(self) -> ModelConfig:
        """The dense model with the same active parameters per token."""
        return dataclasses.replace(self, moe=None, d_ff=self.dense_hidden)


class RMSNorm(nn.Module):
    """y = x / rms(x) · g (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin tables (L, Dh/2) for rotary position embeddings (Su et al. 2021)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang_LH = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
    return ang_LH.cos(), ang_LH.sin()


def apply_rope(x_BHLD: Tensor, cos_LH: Tensor, sin_LH: Tensor) -> Tensor:
    """Rotate pairs (x1, x2) of the head dim by position-dependent angles."""
    x1, x2 = x_BHLD.float().chunk(2, dim=-1)
    cos, sin = cos_LH[: x_BHLD.shape[2]], sin_LH[: x_BHLD.shape[2]]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).to(x_BHLD.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE through ``scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x_BLD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y_BHLD = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y_BHLD.transpose(1, 2).reshape(B, L, D))


class DenseFFN(nn.Module):
    """A dense SwiGLU FFN (the comparison point for the MoE FFN)."""

    def __init__(self, d_model: int, d_hidden: int, init_std: float) -> None:
        super().__init__()
        self.w13_D2F = nn.Parameter(torch.randn(d_model, 2 * d_hidden) * init_std)
        self.w2_FD = nn.Parameter(torch.randn(d_hidden, d_model) * init_std / math.sqrt(2))

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.w13_D2F.to(x.dtype), self.w2_FD.to(x.dtype))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None) -> None:
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn: nn.Module = (
            MoELayer(moe) if moe else DenseFFN(cfg.d_model, cfg.dense_hidden, cfg.init_std)
        )

    def forward(
        self, x_BLD: Tensor, cos: Tensor, sin: Tensor, token_ids: Tensor | None
    ) -> tuple[Tensor, MoEOutput | None]:
        x_BLD = x_BLD + self.attn(self.norm1(x_BLD), cos, sin)
        h = self.norm2(x_BLD)
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h, token_ids=token_ids)
            return x_BLD + out.output, out
        return x_BLD + self.ffn(h), None


@dataclass
class LMOutput:
    """logits (B, L, V); loss: mean next-token cross-entropy (None without targets);
    aux: weighted balance losses averaged over MoE layers; moe: per-MoE-layer outputs."""

    logits: Tensor
    loss: Tensor | None
    aux: Tensor
    moe: list[MoEOutput]


class MoELM(nn.Module):
    """Token embedding -> blocks -> RMSNorm -> LM head (tied to the embedding by default).

    activation_checkpointing: in training forwards with grad, each block's activations are
    recomputed in the backward pass (``train.activation_checkpointing``).
    """

    def __init__(self, cfg: ModelConfig, *, activation_checkpointing: bool = False) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (>= 1) before building the model")
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, cfg.moe_config(i)) for i in range(cfg.n_layers))
        for i, layer in enumerate(self.moe_layers):
            layer.layer_index = i  # named in errors; the index of the *_layers metrics lists
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():
            if name.endswith(("qkv.weight", "proj.weight")):
                nn.init.normal_(p, std=cfg.init_std / (math.sqrt(2) if "proj" in name else 1))
        cos, sin = rope_cache(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers in depth order."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, tokens_BL: Tensor, targets_BL: Tensor | None = None) -> LMOutput:
        if tokens_BL.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {tokens_BL.shape[1]} exceeds model.max_seq_len="
                f"{self.cfg.max_seq_len}"
            )
        x_BLD = self.embed(tokens_BL)
        outs: list[MoEOutput] = []
        for block in self.blocks:
            x_BLD, out = self._block(block, x_BLD, tokens_BL)
            if out is not None:
                outs.append(out)
        logits_BLV = self.head(self.norm(x_BLD))
        loss = None
        if targets_BL is not None:
            loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), targets_BL.flatten())
        aux = torch.stack([o.aux_total for o in outs]).mean() if outs else logits_BLV.new_zeros(())
        return LMOutput(logits=logits_BLV, loss=loss, aux=aux, moe=outs)

    def _block(
        self, block: Block, x_BLD: Tensor, tokens_BL: Tensor
    ) -> tuple[Tensor, MoEOutput | None]:
        """One block, under activation checkpointing when it is on and there is a backward to
        come (non-reentrant: any output structure, the RNG state replayed for router noise)."""
        args = (x_BLD, self.rope_cos, self.rope_sin, tokens_BL)
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def end_step(self, total_steps: int | None = None) -> None:
        """Balance-state update of every MoE layer after an optimizer step."""
        for layer in self.moe_layers:
            layer.balancer.end_step(total_steps)

    def reset_step(self) -> None:
        """Drop the balance counts of the current step in every MoE layer (a skipped step)."""
        for layer in self.moe_layers:
            layer.balancer.reset_step()

    def count_params(self) -> dict[str, int]:
        """Total and active-per-token parameter counts (embedding counted once). Under expert
        parallelism a rank holds E/ep experts per layer; the counts are the whole model's."""
        total = active = sum(p.numel() for p in self.parameters())
        for layer in self.moe_layers:
            local = layer.experts.num_experts  # experts on this rank
            per_expert = layer.experts.params_per_expert
            total += per_expert * (layer.cfg.num_experts - local)
            active -= per_expert * (local - layer.cfg.top_k)
        return {"total": total, "active": active}
