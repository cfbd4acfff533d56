"""``moelab lab``: run the experiment suite (``moelab/lab/experiments/*.toml``) and report it.

``lab run NAME [--quick] [--seeds N] [--out DIR]`` trains every variant through
``moelab.train.train``, runs the experiment's analysis, applies its verdict checks and writes
``result.json`` + PNGs; ``lab list`` lists experiments; ``lab report`` writes one HTML page
and ``results/README.md`` from every ``results/*/result.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.lab.spec import VERDICTS, Experiment, decide, experiment_names, load_experiment

__all__ = ["add_lab_parser", "run_experiment", "decide", "VERDICTS"]


def run_experiment(
    exp: Experiment,
    out: Path,
    *,
    quick: bool = False,
    seeds: int | None = None,
    variants: list[str] | None = None,
    cached_only: bool = False,
    decisive: bool = False,
) -> dict[str, Any]:
    """Train all variants (× seeds), analyse, decide the verdict, write result.json + PNGs."""
    from moelab.lab import plots

    t0 = time.time()
    n_seeds = seeds or default_seeds(exp, quick, decisive)
    names = variants or exp.variant_names(quick)
    runs, table, setup, stale = _train_variants(exp, names, quick, n_seeds, cached_only, decisive)
    if not runs:
        raise ValueError(
            f"{exp.name}: no run trained or cached for variants {names} (--cached-only with an "
            f"empty cache?); {out / 'result.json'} left as it was"
        )
    extra, figs = _analyse(exp, runs, table)
    too_short = size_shortfall(exp, setup, quick)
    verdict, checks = judge(exp, table, extra, setup, too_short)
    result = {
        "name": exp.name,
        "number": exp.number,
        "title": exp.title,
        "claim": exp.claim,
        "verdict": verdict,
        "checks": checks,
        "quick": quick,
        "decisive": decisive,
        "too_short": too_short,
        "seeds": n_seeds,
        "variants_run": list(runs),
        "missing_variants": [v for v in names if v not in runs],
        "paper": exp.paper,
        "measured": table,
        "analysis": extra,
        "setup": setup,
        "stale_runs": stale,
        "fingerprint": _fingerprint_of(runs),
        "batch_tokens": _first(setup, "batch_tokens"),
        "tokens_per_expert_per_step": _first(setup, "tokens_per_expert_per_step"),
        "wall_seconds": round(time.time() - t0, 1),
        "plots": [],
    }
    out.mkdir(parents=True, exist_ok=True)
    for stem, fig in figs.items():
        plots.save(fig, out / f"{stem}.png")
        result["plots"].append(f"{stem}.png")
    (out / "result.json").write_text(json.dumps(result, indent=1, default=float))
    return result


def judge(exp: Experiment, measured, analysis, setup, too_short: str):
    """The experiment's checks applied to measured numbers and analysis: (verdict, rows), with
    its pairing, the run-size shortfall and the noise experiment's MDEs (run and rescore)."""
    return decide(
        exp.checks,
        {**measured, "analysis": analysis},
        paired=bool(exp.options.get("paired", False)),
        too_short=too_short,
        noise_mde=noise_mde_for(setup),
    )


def size_shortfall(exp: Experiment, setup: dict[str, Any], quick: bool) -> str:
    """Why these runs are too short for a verdict ("" when every variant trained at least the
    experiment's decisive steps and tokens)."""
    if quick:
        return "--quick"
    if exp.decisive is None:
        return "the experiment declares no [decisive] size"
    short: dict[str, list[str]] = {}
    for name, s in setup.items():
        if name not in exp.variants:  # a result of an earlier design of the experiment
            short.setdefault("variants of an earlier design", []).append(name)
            continue
        need = _setup(exp.run_config(name, decisive=True), exp.nproc(name))
        if s["steps"] < need["steps"] or s["train_tokens"] < need["train_tokens"]:
            gap = f"{s['steps']} steps × {s['batch_tokens']} tokens < decisive {need['steps']}"
            short.setdefault(gap + f" × {need['batch_tokens']}", []).append(name)
    return "; ".join(f"{gap} ({len(v)} variants)" for gap, v in short.items())


def noise_mde_for(setup: dict[str, Any], path: Path = Path("results/noise/result.json")):
    """``noise_mde(check, n)``: the MDE of a check on ``VARIANT.METRIC`` at n seeds per arm from
    the noise experiment's pooled seed SD of METRIC at the variant's step count (None when the
    noise experiment has not measured that metric at that length)."""
    from moelab.lab.stats import mde_from_sd

    try:
        sd = json.loads(path.read_text())["analysis"]["sd"]
    except (OSError, ValueError, KeyError):
        sd = {}

    def noise_mde(check, n: int) -> float | None:
        variant, _, metric = check.lhs.partition(".")
        steps = setup.get(variant, {}).get("steps")
        value = sd.get(metric, {}).get(str(steps))
        return None if value is None else mde_from_sd(value, n, factor=check.factor)

    return noise_mde


def default_seeds(exp: Experiment, quick: bool, decisive: bool) -> int:
    """Seeds per variant when ``--seeds`` is not given: 1 quick, the decisive table's at the
    decisive size, else the file's ``seeds``."""
    if quick:
        return 1
    return exp.decisive.seeds if decisive and exp.decisive else exp.seeds


def _train_variants(
    exp: Experiment,
    names: list[str],
    quick: bool,
    n_seeds: int,
    cached_only: bool,
    decisive: bool = False,
):
    """Train (or find cached) every variant × seed; returns run folders, numbers, setups and
    the runs whose cached folder was trained by other moelab code."""
    from moelab.lab import runner

    snapshots = int(exp.options.get("snapshots", 0))
    snapshots = 2 if quick and snapshots else snapshots
    runs: dict[str, list[Path]] = {}
    table: dict[str, Any] = {}
    setup: dict[str, Any] = {}
    stale: list[str] = []  # cached runs whose numerics fingerprint differs from today's
    for name in names:
        if name not in exp.variants:
            raise ValueError(f"{exp.name}: no variant {name!r}; variants: {list(exp.variants)}")
        dirs, nums = [], []
        for seed in range(n_seeds):
            cfg = exp.run_config(name, quick=quick, seed=seed, decisive=decisive)
            nproc = exp.nproc(name)
            if runner.has_stale(cfg, snapshots, nproc=nproc):
                stale.append(f"{name} seed {seed}")  # retrained (or skipped: --cached-only)
            if cached_only and not runner.is_cached(cfg, snapshots, nproc=nproc):
                continue
            print(f"[lab] {exp.name}: {name} seed {seed}", flush=True)
            dirs.append(runner.train_cached(cfg, snapshots=snapshots, nproc=nproc))
            nums.append(runner.collect(dirs[-1]))
        if dirs:
            runs[name], table[name] = dirs, runner.aggregate(nums)
            setup[name] = _setup(cfg, nproc)
    return runs, table, setup, stale


def _analyse(exp: Experiment, runs: dict[str, list[Path]], table: dict[str, Any]):
    """The experiment's analysis kind + extra evaluations + the common figures."""
    from moelab.lab import analysis, plots, runner
    from moelab.lab.stats import summarize

    kind = analysis.KINDS[exp.analysis]
    try:
        extra, figs = kind(exp, runs) if kind else ({}, {})
        for name, vals in analysis.extra_evals(exp, runs).items():
            table[name].update({k: summarize(v) for k, v in vals.items()})
        if exp.options.get("contrasts"):
            extra["contrasts"] = contrasts(exp, table)
    except Exception as exc:  # keep the trained numbers; the error is reported in result.json
        print(f"[lab] {exp.name}: analysis failed: {exc!r}", flush=True)
        extra, figs = {"error": repr(exc)}, {}
    figs["curves"] = plots.training_curves({n: runner.curves(d[0]) for n, d in runs.items()})
    figs["pareto"] = plots.pareto(table)
    return extra, figs


def contrasts(exp: Experiment, table: dict[str, Any]) -> dict[str, Any]:
    """The ``[contrasts]`` table: NAME = {"VARIANT.METRIC" = weight, ...} -> per-seed summary of
    the weighted sum (``analysis.contrasts.NAME`` in checks); missing arms are left out."""
    from moelab.lab.spec import contrast_values
    from moelab.lab.stats import summarize

    out = {}
    for name, weights in exp.options.get("contrasts", {}).items():
        vals = contrast_values(table, weights)
        if vals:
            out[name] = summarize(vals)
    return out


def _setup(cfg, nproc: int = 1) -> dict[str, Any]:
    """Batch sizes in tokens: global (``nproc`` ranks with ``parallel.batch = "per_rank"``
    multiply it), computation batch (a micro-batch on every rank) and per expert per step."""
    from moelab.lab.runner import computation_batch_tokens

    moe = cfg.model.moe
    W = nproc if cfg.parallel.batch == "per_rank" else 1
    tok = cfg.train.batch_size * W * cfg.data.seq_len
    micro = computation_batch_tokens(cfg, nproc)
    k, E = (moe.top_k, moe.num_experts) if moe else (0, 1)
    return {
        "processes": nproc,
        "batch_tokens": tok,
        "micro_batch_tokens": micro,
        "tokens_per_expert_per_step": tok * k / E,
        "tokens_per_expert_per_micro_batch": micro * k / E,
        "steps": cfg.train.steps,
        "train_tokens": tok * cfg.train.steps,
        "num_experts": E,
        "top_k": k,
    }


def _fingerprint_of(runs: dict[str, list[Path]]) -> dict[str, Any]:
    """The numerics fingerprint digests and platforms the result's runs were trained with."""
    from moelab.lab import fingerprint

    seen = {}
    for dirs in runs.values():
        for d in dirs:
            fp = fingerprint.read(d) or {}
            seen[fp.get("digest", "none")] = fp.get("platform")
    return seen


def default_out(exp: Experiment, quick: bool, decisive: bool) -> str:
    """results/NAME at the decisive size (the committed verdicts), results/NAME-quick for
    --quick, results/NAME-short for any other size, so that a short run never overwrites a
    decisive result."""
    return f"results/{exp.name}" + ("-quick" if quick else "" if decisive else "-short")


def _first(setup: dict[str, Any], key: str) -> Any:
    return next(iter(setup.values()))[key] if setup else None


# ----------------------------------------------------------------------------- CLI


def _variants(exp: Experiment, choice: str | None, quick: bool) -> list[str]:
    if choice == "reduced":
        return exp.options.get("reduced_variants") or exp.variant_names(quick)
    if choice and choice != "all":
        return choice.split(",")
    return list(exp.variants) if choice == "all" else exp.variant_names(quick)


def pretrain(
    jobs: list[tuple[Experiment, list[str]]],
    *,
    quick: bool,
    seeds: int | None,
    workers: int,
    decisive: bool = False,
) -> None:
    """Train the distinct runs of several experiments in parallel processes (cache warm-up)."""
    from concurrent.futures import ProcessPoolExecutor

    from moelab.lab import runner

    def n_seeds(exp: Experiment) -> int:
        return seeds or default_seeds(exp, quick, decisive)

    todo = {}  # seed-major: an interrupted pretrain still has every variant's first seed
    for seed in range(max(n_seeds(exp) for exp, _ in jobs)):
        for exp, variants in jobs:
            snaps = int(exp.options.get("snapshots", 0))
            snaps = 2 if quick and snaps else snaps
            if seed >= n_seeds(exp):
                continue
            for v in variants:
                cfg = exp.run_config(v, quick=quick, seed=seed, decisive=decisive)
                nproc = exp.nproc(v)
                todo.setdefault(runner.run_key(cfg, snaps, nproc), (cfg, snaps, nproc))
    with ProcessPoolExecutor(workers) as pool:
        futs = [
            pool.submit(runner.train_cached, cfg, snapshots=s, nproc=n)
            for cfg, s, n in todo.values()
        ]
        for f in futs:
            try:
                f.result()
            except Exception as exc:  # reported again when the experiment itself runs
                print(f"[lab] pretrain failed: {exc}", flush=True)


def rescore(exp: Experiment, path: Path) -> dict[str, Any]:
    """Re-apply the experiment's checks to the numbers of an existing result.json."""
    res = json.loads(path.read_text())
    for m in res["measured"].values():  # results from before the noise model: population SDs
        for node in m.values():
            if isinstance(node, dict) and "values" not in node and "std_ddof" not in node:
                node["std_ddof"] = 0
    if exp.options.get("contrasts"):
        res["analysis"]["contrasts"] = contrasts(exp, res["measured"])
    setup = res.get("setup", {})
    too_short = size_shortfall(exp, setup, res.get("quick", False)) if setup else "no setup"
    verdict, checks = judge(exp, res["measured"], res["analysis"], setup, too_short)
    res |= {"verdict": verdict, "checks": checks, "too_short": too_short}
    path.write_text(json.dumps(res, indent=1, default=float))
    return res


def cmd_run(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds={args.seeds}: allowed: an integer >= 1")
    if args.jobs < 1:
        raise ValueError(f"--jobs={args.jobs}: allowed: an integer >= 1")
    if args.quick and args.decisive:
        raise ValueError("--quick and --decisive exclude each other; give one")
    exps = [load_experiment(n) for n in args.names]
    if args.threads:  # part of each run's config, hence of its cache key
        exps = [replace(e, common=[*e.common, f"train.threads={args.threads}"]) for e in exps]
    if args.rescore:
        for exp in exps:
            out = Path(args.out or f"results/{exp.name}")
            if not (out / "result.json").exists():
                raise ValueError(f"--rescore: no {out / 'result.json'} to re-apply the checks to")
            print(f"{exp.name}: {rescore(exp, out / 'result.json')['verdict']}")
        return 0
    if args.out and len(exps) > 1:
        raise ValueError("--out needs a single experiment name")
    jobs = [(e, _variants(e, args.variants, args.quick)) for e in exps]
    if args.jobs > 1 or args.pretrain_only:
        pretrain(
            jobs, quick=args.quick, seeds=args.seeds, workers=args.jobs, decisive=args.decisive
        )
    if args.pretrain_only:
        return 0
    for exp, variants in jobs:
        out = Path(args.out or default_out(exp, args.quick, args.decisive))
        res = run_experiment(
            exp,
            out,
            quick=args.quick,
            seeds=args.seeds,
            variants=variants,
            cached_only=args.cached_only,
            decisive=args.decisive,
        )
        print(f"{exp.name}: {res['verdict']} ({res['wall_seconds']} s) -> {out / 'result.json'}")
        for c in res["checks"]:
            print(f"  [{'x' if c['passed'] else ' '}] {c['check']}: {c['lhs']} vs {c['bound']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name in experiment_names():
        exp = load_experiment(name)
        print(f"{exp.number:>3}  {name:<22} {exp.title}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from moelab.lab.report import write_report

    paths = write_report(Path(args.results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def add_lab_parser(subparsers) -> None:
    """Add ``lab`` with ``run``, ``list`` and ``report`` to the moelab CLI."""
    p = subparsers.add_parser("lab", help="run the experiment suite and report it")
    sub = p.add_subparsers(dest="lab_cmd", required=True)
    r = sub.add_parser("run", help="run experiments of the suite (see `lab list`) or TOML files")
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
    r.set_defaults(func=cmd_run)
    ls = sub.add_parser("list", help="list the experiments")
    ls.set_defaults(func=cmd_list)
    rep = sub.add_parser("report", help="HTML page + results/README.md from results/*")
    rep.add_argument("--results", default="results")
    rep.set_defaults(func=cmd_report)
