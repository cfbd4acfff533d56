"""The ``moelab`` command line: train, eval, route, demo, and the lab / HF / EP tools.

The one home of argparse: every command's arguments are defined here, and each ``cmd_*``
turns parsed arguments into a call of the library function that does the work (``train``,
``run_demo``, ``lab.run_suite``, ``hf.profile``, ``hf.finetune``, ``export_run``,
``placement.simulate_to_folder``). Every command has ``--help``.

Bad input ends with one line ``moelab CMD: error: ...`` and exit status 2, never a
traceback; an unexpected exception (a bug) with one line ``moelab CMD: internal error: ...``
and exit status 1. ``--debug`` (anywhere on the command line) prints the traceback as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

from moelab.checkpoint import CheckpointError
from moelab.errors import RunError
from moelab.signals import Interrupted


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
    if args.ckpt_every is not None and args.ckpt_every < 0:
        raise ValueError(
            f"--ckpt-every {args.ckpt_every} is out of range; allowed: 0 (only at the end) "
            "or an integer >= 1"
        )
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
        ckpt_every=args.ckpt_every,
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
    """The ``moelab`` parser: every subcommand, each with ``func`` set to its ``cmd_*``."""
    parser = argparse.ArgumentParser(
        prog="moelab",
        description="Train Mixture-of-Experts routers, balance their load, and see it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval_route, _add_demo, _add_lab, _add_profile, _add_finetune,
                _add_export, _add_simulate_ep):  # fmt: skip
        add(sub)
    _add_debug(parser)  # before or after the command name
    return parser


def _add_train(sub: argparse._SubParsersAction) -> None:
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
        "--ckpt-every",
        type=int,
        metavar="N",
        help="checkpoint every N steps in this call, without entering the recorded config "
        "(default: train.ckpt_every); a checkpoint changes no number",
    )
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
    sub.add_parser("presets", help="list the built-in configs").set_defaults(func=cmd_presets)


def _add_eval_route(sub: argparse._SubParsersAction) -> None:
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


# ----------------------------------------------------------------------------- demo


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from moelab.demo import DEFAULT_STEPS

    p = sub.add_parser(
        "demo",
        help="train no-balancing / aux-loss / loss-free / dense and write a report",
        description="Train the same small MoE without balancing, with the Switch aux loss "
        "and with loss-free bias balancing, plus the dense twin; write OUT/report.html "
        "(self-contained) and OUT/report.md with plots. Finished runs are skipped on rerun.",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help=f"optimizer steps per run (default {DEFAULT_STEPS}; --quick: 3)",
    )
    p.add_argument("--quick", action="store_true", help="a few tiny steps each (tests, CI)")
    p.add_argument("--config", default="tiny", help="MoE preset or TOML (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed shared by all runs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from moelab.demo import DEFAULT_STEPS, run_demo

    html, md = run_demo(
        args.out,
        steps=args.steps if args.steps else (3 if args.quick else DEFAULT_STEPS),
        quick=args.quick,
        preset=args.config,
        seed=args.seed,
        progress=not args.quiet,
    )
    print(f"report: {html}\n        {md}")
    return 0


# ----------------------------------------------------------------------------- lab


def _add_lab(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="run the experiment suite and report it")
    lab = p.add_subparsers(dest="lab_cmd", required=True)
    _add_lab_run(lab)
    ls = lab.add_parser("list", help="list the experiments (--runs: what the run cache holds)")
    ls.add_argument(
        "--runs",
        action="store_true",
        help="also show, per experiment, its decisive runs done / training / resumable / stale "
        "/ to train in the run cache (runs/lab/cache); trains nothing (restores the committed "
        "run records, results/runs)",
    )
    ls.add_argument("--quick", action="store_true", help="with --runs: the --quick size's runs")
    ls.add_argument(
        "--threads",
        type=int,
        default=0,
        help="with --runs: the --threads the runs were (or will be) trained with (part of each "
        "run's config; default: the file's)",
    )
    ls.set_defaults(func=cmd_lab_list)
    rep = lab.add_parser("report", help="HTML page + results/README.md from results/*")
    rep.add_argument("--results", default="results")
    rep.set_defaults(func=cmd_lab_report)


def _add_lab_run(lab: argparse._SubParsersAction) -> None:
    r = lab.add_parser("run", help="run experiments of the suite (see `lab list`) or TOML files")
    r.add_argument(
        "names", nargs="+", metavar="NAME", help="experiment name(s) (`lab list`) or .toml paths"
    )
    r.add_argument(
        "--jobs", type=int, default=1, help="train the runs in this many parallel processes"
    )
    r.add_argument("--quick", action="store_true", help="CI-sized smoke version (~1 min)")
    r.add_argument(
        "--decisive",
        action="store_true",
        help="train at the experiment's [decisive] size, where its claim can show (the only "
        "size whose checks decide a verdict; -> results/NAME)",
    )
    r.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per variant (default: the file's; its [decisive] seeds with --decisive)",
    )
    r.add_argument(
        "--out",
        default=None,
        help="output folder (default results/NAME with --decisive, results/NAME-quick with "
        "--quick, else results/NAME-short)",
    )
    r.add_argument(
        "--variants", default=None, help="'all', 'reduced' (the file's reduced set) or a,b,c"
    )
    r.add_argument(
        "--cached-only", action="store_true", help="analyse only the runs already trained"
    )
    r.add_argument(
        "--rescore", action="store_true", help="re-apply the checks to an existing result.json"
    )
    r.add_argument("--pretrain-only", action="store_true", help="train the runs, no analysis")
    r.add_argument(
        "--threads",
        type=int,
        default=0,
        help="set train.threads of every run (default: the file's); with --jobs N give "
        "CPUs / N: oversubscribed OpenMP threads run several times slower. Part of each "
        "run's config, so analyse with the same value",
    )
    r.set_defaults(func=cmd_lab_run)


LAB_RUN_OPTIONS = ("jobs", "quick", "decisive", "seeds", "out", "variants", "cached_only",
                   "rescore", "pretrain_only", "threads")  # fmt: skip


def cmd_lab_run(args: argparse.Namespace) -> int:
    from moelab.lab import run_suite

    run_suite(args.names, **{k: getattr(args, k) for k in LAB_RUN_OPTIONS})
    return 0


def cmd_lab_list(args: argparse.Namespace) -> int:
    from moelab.lab import describe_states, run_states, with_threads
    from moelab.lab.spec import experiment_names, load_experiment

    for name in experiment_names():
        exp = load_experiment(name)
        print(f"{exp.number:>3}  {name:<22} {exp.title}", flush=True)
        if args.runs:
            exp = with_threads(exp, args.threads)
            size = "quick" if args.quick else "decisive"
            states = run_states(exp, quick=args.quick, decisive=not args.quick)
            print(f"{'':>5} {size} runs: {describe_states(states)}", flush=True)
    return 0


def cmd_lab_report(args: argparse.Namespace) -> int:
    from moelab.lab.report import write_report

    paths = write_report(Path(args.results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# ----------------------------------------------------------------------------- Hugging Face


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="profile the routers of a transformers MoE model")
    p.add_argument("model", help="folder saved with save_pretrained (or a hub name when online)")
    p.add_argument("--data", nargs="+", required=True, help="text files/folders, one domain each")
    p.add_argument("--out", required=True, help="output folder for profile.json and plots")
    p.add_argument("--max-tokens", type=int, default=None, help="token budget over all domains")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rare-frac", type=float, default=0.1, help="rare: load ≤ this × fair share")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    """``moelab profile``: every option checked before the model is loaded, then a per-layer
    summary."""
    from moelab.hf.profile import check_profile_options, profile, report_lines

    sizes = dict(max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size)
    where = dict(rare_frac=args.rare_frac, device=args.device, dtype=args.dtype)
    check_profile_options(args.out, **sizes, **where)
    result = profile(args.model, args.data, args.out, **sizes, **where, plots=not args.no_plots)
    print(f"{result['tokens']} tokens, {result['tokens_per_s']:.0f} tokens/s -> {args.out}")
    print("\n".join(report_lines(result)))
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from moelab.hf.finetune import DEFAULT_BALANCE, FinetuneConfig

    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune a transformers MoE model, moelab balance")
    p.add_argument("model", help="folder saved with save_pretrained (or a hub name when online)")
    p.add_argument("--data", nargs="+", required=True, help="text files/folders")
    p.add_argument("--out", required=True, help="output folder (model, balance state, metrics)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 = off")
    p.add_argument("--freeze-router", action="store_true", help="no gradient to router weights")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens read per --data path")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="balance.KEY=VALUE",
        help=f"balance setting (defaults {DEFAULT_BALANCE}), e.g. --set balance.bias_rate=1e-3",
    )
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    """``moelab finetune``: options and ``--out`` checked first; prints the first and last step."""
    from moelab.hf.attach import STATE_FILE
    from moelab.hf.finetune import (
        FINETUNE_FILES,
        FinetuneConfig,
        balance_from_overrides,
        finetune,
    )
    from moelab.hf.profile import check_device
    from moelab.runfolder import check_model_folder

    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens} is out of range; allowed: >= 1")
    check_device(args.device)
    fields = dataclasses.fields(FinetuneConfig)
    cfg = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields})
    balance = balance_from_overrides(args.overrides)
    check_model_folder(args.out, "finetune", FINETUNE_FILES)
    rows = finetune(args.model, args.data, args.out, cfg=cfg, balance=balance, device=args.device)
    for row in (rows[0], rows[-1]):
        print(f"step {row['step']:5d}  loss {row['loss']:.4f}  maxvio {row['maxvio']:.3f}")
    print(f"saved model + {STATE_FILE} -> {args.out}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a trained run as a transformers model (Mixtral / Llama)"
    )
    p.add_argument("run", help="run folder (its latest checkpoint) or a ckpt-*.pt file")
    p.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    p.add_argument("--no-verify", action="store_true", help="skip the logits check before writing")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from moelab.hf.export import export_run

    print(export_run(args.run, args.out, verify=not args.no_verify))
    return 0


# ----------------------------------------------------------------------------- simulate-ep


def _add_simulate_ep(sub: argparse._SubParsersAction) -> None:
    from moelab.placement import DEFAULT_EP_SIZES

    p = sub.add_parser(
        "simulate-ep",
        help="simulate expert parallelism (1-256 devices) on saved routing traces",
        description="Per-device load, MaxVio, straggler factor and all-to-all bytes for EP "
        "sizes 1..256, contiguous vs rebalanced (EPLB-style) placement.",
    )
    p.add_argument("trace", help="routing trace file (.pt from save_traces / --from-run)")
    p.add_argument("--out", required=True, help="folder for simulate_ep.{md,json,png}")
    p.add_argument(
        "--from-run", metavar="RUN", help="first trace this run folder or checkpoint into TRACE"
    )
    p.add_argument("--tokens", type=int, default=8192, help="tokens to trace (--from-run)")
    p.add_argument(
        "--ep-sizes",
        default=",".join(map(str, DEFAULT_EP_SIZES)),
        help="comma-separated device counts (default 1..256, powers of two)",
    )
    p.add_argument("--redundant", type=int, default=1, help="extra replicas per device")
    p.add_argument("--bytes-per-elt", type=int, default=2, help="activation bytes (bf16: 2)")
    p.set_defaults(func=cmd_simulate_ep)


def cmd_simulate_ep(args: argparse.Namespace) -> int:
    from moelab.placement import check_options, simulate_to_folder

    opts = dict(redundant=args.redundant, tokens=args.tokens, from_run=args.from_run)
    opts |= dict(bytes_per_elt=args.bytes_per_elt)
    sizes = check_options(args.trace, args.out, ep_sizes=args.ep_sizes, **opts)
    print(simulate_to_folder(args.trace, args.out, sizes, **opts).read_text())
    return 0


# ----------------------------------------------------------------------------- main


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


def _stdout_closed() -> int:
    """Exit status 141 (128 + SIGPIPE, as a shell reports a pipe writer cut off), with stdout
    pointed at /dev/null so that the interpreter's final flush raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


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
    except BrokenPipeError:  # the reader left (`moelab lab list | head`): stop quietly
        return _stdout_closed()
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
