"""The ``moelab`` command line: train, eval, route, demo, and the lab / HF / EP tools.

Every command has ``--help``. Bad input ends with one line ``moelab CMD: error: ...`` and
exit status 2, never a traceback; an unexpected exception (a bug) with one line
``moelab CMD: internal error: ...`` and exit status 1. ``--debug`` (anywhere on the command
line) prints the traceback as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import traceback

from moelab.checkpoint import CheckpointError
from moelab.errors import RunError
from moelab.signals import Interrupted

# (module, function adding the subcommand parser): each sets ``func`` returning an exit code.
_PLUGINS = [
    ("moelab.demo", "add_demo_parser"),
    ("moelab.lab", "add_lab_parser"),
    ("moelab.hf.profile", "add_profile_parser"),
    ("moelab.hf.finetune", "add_finetune_parser"),
    ("moelab.hf.export", "add_export_parser"),
    ("moelab.placement", "add_simulate_ep_parser"),
]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="tiny",
        help="a TOML file, a run's config.json or a preset name (default: tiny); "
        "see `moelab presets`",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set model.moe.balance.aux_coef=0.01 "
        "(repeatable; values are TOML)",
    )
    p.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="text files, folders or globs (each path one domain); 'builtin' = the "
        "vendored corpus + Python stdlib (the default)",
    )


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default=None,
        help="auto, cpu, cuda or cuda:N (default: the checkpoint's train.device; a checkpoint "
        "saved on any device loads on any other)",
    )


def _config(args: argparse.Namespace):
    from moelab.runconfig import load_run_config

    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append("data.sources=" + json.dumps(list(args.data)))
        if "builtin" not in args.data:  # data.domains selects builtin domains only
            overrides.append("data.domains=[]")
    return load_run_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from moelab.train import train

    steps = args.max_steps
    if steps is not None and steps < 1:
        raise ValueError(f"--max-steps {steps} is out of range; allowed: an integer >= 1")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other; allowed: one of them")
    cfg = _config(args)
    if steps and steps > cfg.train.steps:  # --max-steps beyond the schedule extends it
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    summary = train(
        cfg,
        args.out,
        resume=args.resume,
        max_steps=steps,
        progress=not args.quiet,
        overwrite=args.overwrite,
        allow_change=tuple(args.allow_change),
    )
    if summary and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 only
        keys = ("steps", "val_loss", "maxvio_global", "mi")
        print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from moelab.inspect import load_trained

    if args.max_tokens < 0:
        raise ValueError(
            f"--max-tokens {args.max_tokens} is out of range; allowed: 0 (all) or a positive "
            "integer"
        )
    run = load_trained(args.checkpoint, args.data, device=args.device)
    from moelab.evaluate import evaluate

    res = evaluate(
        run.model,
        run.corpus,
        batch_size=run.cfg.train.batch_size,
        seq_len=run.cfg.data.seq_len,
        max_tokens=args.max_tokens,
    )
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            if not isinstance(v, list):
                print(f"{k:34s} {v:.4f}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from moelab.inspect import load_trained, route_text

    try:
        args.text.encode("utf-8")
    except UnicodeEncodeError as exc:  # undecodable bytes in argv arrive as surrogates
        raise ValueError(
            f"--text holds bytes that are not UTF-8 (at character {exc.start}); give UTF-8 text"
        ) from None
    run = load_trained(args.checkpoint, None, device=args.device)
    table = route_text(run, args.text)
    if args.json:
        print(json.dumps(table))
        return 0
    layers = len(table["layers"])
    print("token".ljust(18) + "".join(f"layer {i}".ljust(14) for i in range(layers)))
    for t, tok in enumerate(table["tokens"]):
        cells = ["/".join(map(str, table["layers"][i][t])).ljust(14) for i in range(layers)]
        print(repr(tok)[:17].ljust(18) + "".join(cells))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from moelab.runconfig import PRESETS, preset_names

    for name in preset_names():
        first = (PRESETS / f"{name}.toml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:14s} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelab",
        description="Train Mixture-of-Experts routers, balance their load, and see it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "train",
        help="train a model from a TOML config or preset",
        description="Train an MoE (or dense) LM; writes OUT/metrics.jsonl, "
        "OUT/config.json, checkpoints and OUT/summary.json.",
    )
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--max-steps", type=int, help="stop after N steps (checkpoint written)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's latest checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in OUT (its checkpoints are removed)",
    )
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="with --resume: accept this setting differing from the checkpoint's, e.g. "
        "train.lr (repeatable; more steps and logging/eval cadence are always accepted)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on the validation split",
        description="Validation loss per domain, MaxVio_global, MI.",
    )
    p.add_argument("checkpoint", help="a run folder or a ckpt-*.pt file")
    p.add_argument("--data", nargs="+", metavar="PATH", help="evaluate on other text")
    p.add_argument("--max-tokens", type=int, default=0, help="per domain (0 = all)")
    _add_device_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "route",
        help="show which experts each token goes to, per layer",
        description="Route a text through a trained model and print the "
        "top-k experts of every token in every MoE layer.",
    )
    p.add_argument("checkpoint", help="a run folder or a ckpt-*.pt file")
    p.add_argument("--text", required=True, help="the text to route")
    _add_device_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("presets", help="list the built-in configs")
    p.set_defaults(func=cmd_presets)

    for module, fn in _PLUGINS:
        try:
            getattr(importlib.import_module(module), fn)(sub)
        except (ImportError, AttributeError):
            continue  # optional part not installed (e.g. transformers for the HF commands)
    _add_debug(parser)  # before or after the command name
    return parser


# Errors the user can act on: one line ``moelab CMD: error: ...``, exit status 2.
USER_ERRORS = (ValueError, CheckpointError, RunError, OSError, FloatingPointError)
INTERNAL_ERROR = 1  # exit status of an unexpected exception (a bug: please report it)


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on ``parser`` and every (nested) subcommand, so it goes anywhere."""
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, print the Python traceback too",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug(child)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def enable_huge_pages() -> None:
    """Back torch's CPU buffers of 2 MiB and more with transparent huge pages.

    PyTorch reads THP_MEM_ALLOC_ENABLE at its first such allocation, so this works after
    ``import torch``. A fresh 64 MiB buffer then costs ~20 ms of page faults instead of ~55 ms
    on a 2-core VM; MoE weight gradients are E/k times a dense layer's and fresh every step
    (docs/benchmarks.md). The command does it; a library user opts in by calling this or by
    setting the variable. Set THP_MEM_ALLOC_ENABLE=0 to opt out.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    """Run one ``moelab`` command; every failure ends in one line on stderr (``--debug``: the
    traceback as well): exit 2 for bad input or a failed run, 1 for an internal error,
    130 / 143 for SIGINT / SIGTERM."""
    enable_huge_pages()
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except Interrupted as exc:
        print(f"moelab {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"moelab {args.command}: error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moelab {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line, the traceback only when asked for
        if debug:
            traceback.print_exc()
        print(
            f"moelab {args.command}: internal error: {type(exc).__name__}: {_first_line(exc)} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
