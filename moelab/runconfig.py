"""Run configuration: the training, parallel and top-level configs, presets and TOML loading.

A run is ``RunConfig(model, data, train, parallel)``: TOML tables ``[model]`` (with
``[model.moe]`` and its ``router`` / ``balance`` / ``capacity`` sub-tables), ``[data]``,
``[train]`` and ``[parallel]``; ``base = "preset"`` inherits from a built-in preset, and
``--set key=value`` overrides any field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moelab.config import _check_literals, apply_overrides, check_range, from_dict, load_toml
from moelab.data import DataConfig, absolute_path
from moelab.device import check_spec
from moelab.model import ModelConfig

PRESETS = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping.

    batch_size: sequences per optimizer step over all ranks (the global batch).
    micro_batch_size: sequences per forward pass on one rank; the rest is gradient
        accumulation. 0 = the rank's whole share in one pass.
    nonfinite: what NaN/inf router logits, loss or gradient do: ``stop`` (raise, naming the
        step and the MoE layer) or ``skip`` (no update, balance accumulators reset, a
        ``skipped`` row logged, and go on).
    eval_max_tokens: validation tokens per domain per evaluation (0 = the whole split).
    train_eval_gap: log ``train_eval_gap`` on every logged step: the loss of the step's first
        micro-batch in inference mode (hard top-k without noise, masking or soft warm-up, the
        evaluation capacity) minus its loss in training mode, both before the update: the
        train/inference mismatch that soft warm-up, routing noise and capacity leave (seed
        001). Costs one extra no-grad forward per logged step; does not change training.
    activation_checkpointing: recompute each transformer block's activations in the backward
        pass instead of keeping them (``torch.utils.checkpoint``, non-reentrant): less memory,
        one more forward per block. The recompute counts nothing for the balancer (no doubled
        loss-free or global-aux counts, torchtitan#4772) and gives the same numbers.
    device: where the run computes (:mod:`moelab.device`): ``auto`` (CUDA when available,
        else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; under torchrun each rank takes its
        ``LOCAL_RANK`` GPU. Asking for CUDA on a machine without it is an error at the start.
    dtype: ``fp32``, or ``bf16``: autocast to bfloat16 on the run's device type (matmuls and
        experts in bf16, the loss and balance statistics in fp32); the router stays fp32
        unless ``model.moe.router.dtype`` says otherwise. fp32 is what the golden losses and
        bit-exact resume are checked in.
    """

    _prefix = "train"

    steps: int = 300
    batch_size: int = 16
    micro_batch_size: int = 0
    lr: float = 3.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    seed: int = 0
    dtype: Literal["fp32", "bf16"] = "fp32"
    log_every: int = 10
    eval_every: int = 100
    eval_max_tokens: int = 32768
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    nonfinite: Literal["stop", "skip"] = "stop"
    threads: int = 0
    tensorboard: bool = True
    train_eval_gap: bool = False
    activation_checkpointing: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_literals(self)
        check_spec(self.device, "train.device")
        for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
            check_range(f"train.{name}", getattr(self, name), lo=1)
        for name in (
            "micro_batch_size",
            "warmup_steps",
            "eval_every",
            "eval_max_tokens",
            "ckpt_every",
            "threads",
            "weight_decay",
            "grad_clip",
        ):
            check_range(f"train.{name}", getattr(self, name), lo=0)
        check_range("train.lr", self.lr, lo=0, lo_open=True)
        check_range("train.min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        for name in ("beta1", "beta2"):  # AdamW's own range
            check_range(f"train.{name}", getattr(self, name), lo=0, hi=1, hi_open=True)


@dataclass(frozen=True)
class ParallelConfig:
    """Expert parallelism under torchrun (see moelab.parallel).

    ep: expert-parallel group size (must divide the world size and the expert count).
    batch: ``global`` — train.batch_size is the global batch, split over data ranks (same loss
        curve for any world size); ``per_rank`` — train.batch_size sequences on *each* rank, so
        more ranks mean a larger computation batch (seed 003's setting).
    timeout_s: a collective that does not finish in this time raises on every rank.
    """

    _prefix = "parallel"

    ep: int = 1
    batch: Literal["global", "per_rank"] = "global"
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        _check_literals(self)
        check_range("parallel.ep", self.ep, lo=1)
        check_range("parallel.timeout_s", self.timeout_s, lo=0, lo_open=True)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; written as ``config.json`` beside its metrics."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


def preset_names() -> list[str]:
    """Names of the built-in presets (``moelab/presets/*.toml``)."""
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def load_config_dict(source: str | None, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset name, a TOML path or a run's ``config.json`` as a dict; ``base = "preset"``
    inherits from a preset (a ``base`` loop is refused naming the chain)."""
    if source is None:
        return {}
    key = source if source in preset_names() else str(Path(source).resolve())
    if key in _chain:
        raise ValueError(f"config base loop: {' -> '.join((*_chain, key))}; break the loop")
    if source in preset_names():
        data = load_toml(PRESETS / f"{source}.toml")
    elif source.endswith((".toml", ".json")) or os.path.sep in source:
        data = load_toml(source)  # .json: a run's config.json, to rerun exactly that config
    else:
        raise ValueError(
            f"config {source!r} is neither a TOML or config.json file nor a preset; presets: "
            f"{preset_names()}"
        )
    if not isinstance(data, dict):
        raise ValueError(
            f"config {source!r} holds a {type(data).__name__}, not a table of settings"
        )
    base = data.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"base={base!r} in {source!r} is not allowed; expected a preset or file")
    return _merge(load_config_dict(base, (*_chain, key)), data) if base else data


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(data: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    """Resolve a config dict + ``--set`` overrides into a validated RunConfig."""
    data = apply_overrides(data, list(overrides))
    for table in ("model", "data", "train", "parallel"):
        if not isinstance(data.get(table, {}), dict):
            raise ValueError(
                f"{table}={data[table]!r} is not allowed; expected a table of settings"
            )
    model = data.setdefault("model", {})
    moe = model.get("moe", {})
    if moe in (False, "none", None):
        model["moe"] = None
    elif isinstance(moe, dict):
        moe.setdefault("d_model", model.get("d_model", ModelConfig.d_model))
        for key in ("num_experts", "top_k", "d_expert"):
            moe.setdefault(key, getattr(_default_moe(), key))
        model["moe"] = moe
    return absolute_data(from_dict(RunConfig, data))


def absolute_data(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its data sources and cache folder absolute (``moelab.data.absolute_path``):
    the config.json of a run then reads the same text wherever eval or route run from."""
    d = cfg.data
    sources = tuple(absolute_path(s) for s in d.sources)
    cache_dir = absolute_path(d.cache_dir)
    if (sources, cache_dir) == (d.sources, d.cache_dir):
        return cfg
    return dataclasses.replace(
        cfg, data=dataclasses.replace(d, sources=sources, cache_dir=cache_dir)
    )


def _default_moe():
    return ModelConfig().moe


def load_run_config(source: str | None, overrides: list[str] = ()) -> RunConfig:
    """``load_config_dict`` then ``build_config``."""
    return build_config(load_config_dict(source), overrides)
