"""Hugging Face transformers MoE models: routing profiler and moelab-balanced fine-tuning.

- :func:`profile` / ``moelab profile``: per-layer expert load, MaxVio, CV, dead and rare experts,
  routing entropy, co-activation and per-domain expert frequency, from the routers' own choices.
- :func:`attach`: loss-free bias, global-scope aux loss and z-loss on a model for training.
- :func:`finetune` / ``moelab finetune``: a small AdamW loop using :func:`attach`.
- :class:`MoEBalanceCallback`: the same balancing in a ``transformers.Trainer`` (or TRL's),
  logging routing health (MaxVio per layer, dead experts, bias range).
- :func:`find_routers` / :mod:`moelab.hf.families`: the family registry (one row per
  transformers MoE family) and rule inference for router classes in no row.
- :func:`export_to_hf` / ``moelab export``: a trained moelab LM as ``MixtralForCausalLM``
  (``LlamaForCausalLM`` when dense), or a one-line refusal naming what Mixtral cannot express.

The command line (``moelab profile|finetune|export``) is defined in :mod:`moelab.cli`;
``python -m moelab.hf ...`` is the same command. See docs/hf.md.
"""

from __future__ import annotations

from moelab.hf.attach import STATE_FILE, BalanceHandle, StepStats, attach, disable_model_aux
from moelab.hf.export import export_problems, export_run, export_to_hf
from moelab.hf.finetune import FinetuneConfig, balance_from_overrides, finetune
from moelab.hf.outputs import select
from moelab.hf.profile import load_model, profile, profile_model
from moelab.hf.routers import NoMoERouterError, RouterSite, capture_routing, find_routers

__all__ = [
    "STATE_FILE",
    "MoEBalanceCallback",
    "BalanceHandle",
    "FinetuneConfig",
    "NoMoERouterError",
    "RouterSite",
    "StepStats",
    "attach",
    "balance_from_overrides",
    "capture_routing",
    "disable_model_aux",
    "export_problems",
    "export_run",
    "export_to_hf",
    "find_routers",
    "finetune",
    "load_model",
    "main",
    "profile",
    "profile_model",
    "profile_main",
    "finetune_main",
    "select",
]


def __getattr__(name: str):
    """``MoEBalanceCallback`` imports transformers, so it loads on first use."""
    if name == "MoEBalanceCallback":
        from moelab.hf.callback import MoEBalanceCallback

        return MoEBalanceCallback
    raise AttributeError(f"module 'moelab.hf' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """``python -m moelab.hf {profile,finetune} ...``: the ``moelab`` command itself (one parser,
    one error handler: a failure is one line, ``--debug`` for the traceback)."""
    from moelab.cli import main as cli_main

    return cli_main(argv)


def profile_main(argv: list[str]) -> int:
    """``moelab profile ARGS`` (argv without the subcommand name)."""
    return main(["profile", *argv])


def finetune_main(argv: list[str]) -> int:
    """``moelab finetune ARGS`` (argv without the subcommand name)."""
    return main(["finetune", *argv])
