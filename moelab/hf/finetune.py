"""``moelab finetune``: causal-LM fine-tuning of a transformers MoE model with moelab balancing.

The model's own router aux loss is switched off and :func:`moelab.hf.attach` balances instead
(default: loss-free bias u=1e-3 plus a global-scope Switch loss 1e-3; change with
``--set balance.KEY=VALUE``). Every optimizer step appends loss, aux loss and MaxVio to
``DIR/metrics.jsonl``; the end saves the model (``save_pretrained``), its tokenizer if it has one,
the attached balance state (``moelab_balance.pt``) and the resolved settings
(``finetune_config.json``) to DIR.

Shape legend: B sequences, L sequence length.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moelab.config import (
    BalanceConfig,
    _check_literals,
    apply_overrides,
    check_range,
    from_dict,
    to_dict,
)
from moelab.hf.attach import STATE_FILE, attach
from moelab.hf.profile import default_device, load_model, write_json
from moelab.hf.text import domain_stream, load_domains, load_hf_tokenizer, model_tokenizer

DEFAULT_BALANCE: dict[str, Any] = {"bias_rate": 1.0e-3, "aux_coef": 1.0e-3, "aux_scope": "global"}


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning loop settings (AdamW, random windows of the concatenated --data text)."""

    _prefix = "finetune"

    steps: int = 100
    lr: float = 1.0e-5
    weight_decay: float = 0.0
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    grad_clip: float = 1.0
    freeze_router: bool = False
    max_tokens: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_literals(self)
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            check_range(f"finetune.{name}", getattr(self, name), lo=1)
        check_range("finetune.lr", self.lr, lo=0)
        check_range("finetune.weight_decay", self.weight_decay, lo=0)
        check_range("finetune.grad_clip", self.grad_clip, lo=0)


def balance_from_overrides(overrides: list[str]) -> BalanceConfig:
    """BalanceConfig from ``DEFAULT_BALANCE`` and ``balance.KEY=VALUE`` overrides."""
    data = apply_overrides({"balance": dict(DEFAULT_BALANCE)}, overrides)
    other = sorted(set(data) - {"balance"})
    if other:
        raise ValueError(f"--set {other[0]}...: finetune only accepts balance.KEY=VALUE overrides")
    return from_dict(BalanceConfig, data["balance"], where="balance")


def random_windows(stream: Tensor, seq_len: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless ``(B, L)`` batches of random windows of a token stream (seeded)."""
    if stream.numel() < 2:
        raise ValueError("--data holds fewer than 2 tokens; nothing to fine-tune on")
    L = min(seq_len, stream.numel())
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts_B = torch.randint(0, stream.numel() - L + 1, (batch_size,), generator=gen)
        yield torch.stack([stream[s : s + L] for s in starts_B.tolist()])


def finetune(
    model: str,
    data: list[str],
    out: str | Path,
    *,
    cfg: FinetuneConfig = FinetuneConfig(),
    balance: BalanceConfig | None = None,
    device: str | None = None,
) -> list[dict[str, Any]]:
    """``moelab finetune`` as a function; returns the metric rows also written to metrics.jsonl.

    A model folder that already holds ``moelab_balance.pt`` resumes its biases and counts.
    """
    balance = balance or balance_from_overrides([])
    torch.manual_seed(cfg.seed)
    net = load_model(model, device=device or default_device(), dtype="float32")
    handle = attach(net, balance, from_folder=model, total_steps=cfg.steps)
    handle.freeze_routers(cfg.freeze_router)
    for line in handle.describe():
        print(f"moelab finetune: {line}")  # what is active: a note, not an error (stdout)
    tokenize = model_tokenizer(model, net.config.vocab_size)
    stream = torch.cat([domain_stream(d, tokenize, cfg.max_tokens) for d in load_domains(data)])
    windows = random_windows(stream, cfg.seq_len, cfg.batch_size, cfg.seed)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(model), "data": [str(p) for p in data], "finetune": asdict(cfg)}
    write_json(out / "finetune_config.json", settings | {"balance": to_dict(balance)})
    rows: list[dict[str, Any]] = []
    net.train()
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as log:
        for step in range(cfg.steps):
            row = {"step": step + 1} | _step(net, handle, opt, params, windows, cfg)
            row["tokens"] += rows[-1]["tokens"] if rows else 0  # cumulative
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"step {step + 1}: loss is {row['loss']}; lower --lr")
            log.write(json.dumps(row) + "\n")
            log.flush()
            rows.append(row)
    _save(net, handle, model, out)
    return rows


def _step(net, handle, opt, params, windows: Iterator[Tensor], cfg: FinetuneConfig) -> dict:
    """One optimizer step of ``cfg.grad_accum`` micro-batches (LM loss + moelab balance loss,
    then the balancer's end of step); its metric row without the step number."""
    t0 = time.perf_counter()
    dev = next(net.parameters()).device
    lm_sum = aux_sum = 0.0
    tokens = 0
    for _ in range(cfg.grad_accum):
        ids_BL = next(windows).to(dev)
        lm_loss = net(input_ids=ids_BL, labels=ids_BL, use_cache=False).loss
        if lm_loss is None:
            raise ValueError(
                f"{type(net).__name__} returns no LM loss; finetune needs a causal-LM, "
                "seq2seq or image-text-to-text checkpoint"
            )
        aux = handle.aux_loss()
        ((lm_loss + aux) / cfg.grad_accum).backward()
        lm_sum += lm_loss.item()
        aux_sum += aux.item()
        tokens += ids_BL.numel()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    stats = handle.end_step()
    return {
        "loss": lm_sum / cfg.grad_accum,
        "aux_loss": aux_sum / cfg.grad_accum,
        "maxvio": stats.maxvio,
        "maxvio_layers": stats.maxvio_layers,
        "bias_rate": stats.bias_rate,
        "aux_coef": stats.aux_coef,
        "tokens": tokens,
        "step_s": time.perf_counter() - t0,
    }


def _save(net, handle, model: str, out: Path) -> None:
    """The fine-tuned model (its own aux-loss settings restored), its tokenizer if it has one,
    and the balance state, into ``out``."""
    handle.detach()  # the saved config keeps the model's own aux-loss settings
    net.save_pretrained(out)
    tokenizer = load_hf_tokenizer(model)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    handle.save(out)


FINETUNE_FILES = (STATE_FILE, "finetune_config.json", "metrics.jsonl")
