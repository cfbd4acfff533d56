"""The lab: run the experiment suite (``moelab/lab/experiments/*.toml``) and report it.

:func:`run_suite` (``moelab lab run NAME [--quick|--decisive] [--seeds N] [--out DIR]``) trains
every variant through ``moelab.train.train``, runs the experiment's analysis, applies its
verdict checks and writes ``result.json`` + PNGs; ``lab list`` lists experiments; ``lab report``
(:func:`moelab.lab.report.write_report`) writes one HTML page and ``results/README.md`` from
every ``results/*/result.json``. The command line itself is in :mod:`moelab.cli`.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from moelab.errors import RunError
from moelab.lab.spec import VERDICTS, Experiment, decide, load_experiment
from moelab.runfolder import check_output_folder
from moelab.signals import Interrupted, defer_signals, stop_pending

__all__ = ["run_suite", "run_experiment", "decide", "VERDICTS"]


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
    missing = [v for v in names if v not in runs]
    if cached_only and missing:
        print(f"[lab] {exp.name}: no cached runs of {missing} (--seeds and --threads are part "
              "of each run's key: use the values they were trained with)", flush=True)  # fmt: skip
    extra, figs = _analyse(exp, runs, table, strict=cached_only)
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
        "missing_variants": missing,
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
    _write_json(out / "result.json", result)
    return result


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary file, then ``os.replace``): a stop mid-write leaves
    the previous file whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


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


def snapshot_count(exp: Experiment, quick: bool) -> int:
    """Routing snapshots per run of ``exp``: its ``snapshots`` option, 2 at the quick size."""
    n = int(exp.options.get("snapshots", 0))
    return 2 if quick and n else n


def with_threads(exp: Experiment, threads: int) -> Experiment:
    """``exp`` with ``train.threads`` set for every run (0: the file's); part of each run's
    config, hence of its cache key."""
    return replace(exp, common=[*exp.common, f"train.threads={threads}"]) if threads else exp


def _train_variants(
    exp: Experiment,
    names: list[str],
    quick: bool,
    n_seeds: int,
    cached_only: bool,
    decisive: bool = False,
):
    """Train (or find cached) every variant × seed; returns run folders, numbers, setups and
    the runs whose cached folder was trained by other moelab code. At the decisive size each
    run's record is kept in ``runner.RECORDS`` (committed with the results)."""
    from moelab.lab import analysis, runner

    snapshots = snapshot_count(exp, quick)
    weights = analysis.needs_weights(exp)
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
            if cached_only and not runner.is_cached(cfg, snapshots, nproc=nproc, weights=weights):
                continue
            print(f"[lab] {exp.name}: {name} seed {seed}", flush=True)
            out = runner.train_cached(
                cfg, snapshots=snapshots, nproc=nproc, weights=weights, record=decisive
            )
            dirs.append(out)
            nums.append(runner.collect(dirs[-1]))
        if dirs:
            runs[name], table[name] = dirs, runner.aggregate(nums)
            setup[name] = _setup(cfg, nproc)
    return runs, table, setup, stale


RUN_STATES = ("done", "training", "resumable", "stale", "to train")


def run_states(
    exp: Experiment, *, quick: bool = False, decisive: bool = True, seeds: int | None = None
) -> dict[str, list[str]]:
    """What the run cache holds for each variant of ``exp``, seed by seed (one of
    :data:`RUN_STATES`): ``done`` (finished by code with today's numerics fingerprint; `lab
    run` reuses it), ``training`` (a live process holds its lock), ``resumable`` (cut off;
    continues from its checkpoint), ``stale`` (trained by other numerics: retrained) or ``to
    train``. Trains nothing (a run the cache lacks is restored from its committed record)."""
    from moelab.lab import analysis, runner

    snapshots = snapshot_count(exp, quick)
    weights = analysis.needs_weights(exp)
    n_seeds = seeds or default_seeds(exp, quick, decisive)
    states: dict[str, list[str]] = {}
    for name in exp.variant_names(quick):
        nproc = exp.nproc(name)
        row = states.setdefault(name, [])
        for seed in range(n_seeds):
            cfg = exp.run_config(name, quick=quick, seed=seed, decisive=decisive)
            row.append(runner.run_state(cfg, snapshots, nproc=nproc, weights=weights))
    return states


def describe_states(states: dict[str, list[str]]) -> str:
    """One line: ``7/21 done, 1 resumable; to run: cf1.0_score (seeds 1, 2), ...`` (every
    run not done is to run: the training, resumable and stale ones too)."""
    flat = [s for row in states.values() for s in row]
    head = f"{flat.count('done')}/{len(flat)} done" + "".join(
        f", {flat.count(s)} {s}" for s in RUN_STATES[1:4] if s in flat
    )
    todo = [
        f"{name} (seed{'s' if len(left) > 1 else ''} {', '.join(map(str, left))})"
        for name, row in states.items()
        if (left := [i for i, s in enumerate(row) if s != "done"])
    ]
    return head + (f"; to run: {', '.join(todo)}" if todo else "")


def _analyse(
    exp: Experiment, runs: dict[str, list[Path]], table: dict[str, Any], strict: bool = False
):
    """The experiment's analysis kind + extra evaluations + the common figures. An analysis
    error is kept in result.json (the trained numbers stay), unless ``strict`` (--cached-only:
    nothing was trained, so the committed result.json is worth more): then it raises."""
    from moelab.lab import analysis, plots, runner
    from moelab.lab.stats import summarize

    kind = analysis.KINDS[exp.analysis]
    try:
        extra, figs = kind(exp, runs) if kind else ({}, {})
        for name, vals in analysis.extra_evals(exp, runs).items():
            table[name].update({k: summarize(v) for k, v in vals.items()})
        if exp.options.get("contrasts"):
            extra["contrasts"] = contrasts(exp, table)
    except Interrupted:  # a stop (LabStopped, a run's Interrupted): result.json left as it was
        raise
    except Exception as exc:  # keep the trained numbers; the error is reported in result.json
        if strict:
            raise ValueError(
                f"{exp.name}: analysis failed: {exc}; result.json left as it was"
            ) from exc
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

    from moelab.lab import analysis, runner

    def n_seeds(exp: Experiment) -> int:
        return seeds or default_seeds(exp, quick, decisive)

    todo = {}  # seed-major: an interrupted pretrain still has every variant's first seed
    for seed in range(max(n_seeds(exp) for exp, _ in jobs)):
        for exp, variants in jobs:
            snaps = snapshot_count(exp, quick)
            if seed >= n_seeds(exp):
                continue
            for v in variants:
                cfg = exp.run_config(v, quick=quick, seed=seed, decisive=decisive)
                nproc = exp.nproc(v)
                weights = analysis.needs_weights(exp)
                key = runner.run_key(cfg, snaps, nproc)
                if key not in todo or weights:  # shared by experiments: one needing weights wins
                    todo[key] = (cfg, snaps, nproc, weights, decisive)
    stop = multiprocessing.get_context().Event()
    with ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(stop,)) as pool:
        with _stop_pool_on_signals(pool, stop) as flag:
            futs = [pool.submit(_pool_job, *job) for job in todo.values()]
            for f in futs:
                try:
                    f.result()
                except runner.TrainingElsewhere as exc:
                    print(f"[lab] skipped: {exc}", flush=True)
                except Exception as exc:  # reported again when the experiment itself runs
                    if flag.signum is None:
                        print(f"[lab] pretrain failed: {exc}", flush=True)
    if flag.signum is not None:
        raise LabStopped(flag.signum)


# ----------------------------------------------------------------------------- stopping

_STOP = None  # in a pool worker: the Event the parent sets when the lab is told to stop


class LabStopped(Interrupted):
    """``lab run`` stopped on SIGINT / SIGTERM (exit status 130 / 143). Finished runs stay in
    the cache; the next ``lab run`` resumes an unfinished one from its checkpoint (see
    :func:`moelab.lab.runner.train_cached`)."""

    def __init__(self, signum: int) -> None:
        RunError.__init__(
            self,
            f"stopped by {signal.Signals(signum).name}; finished runs stay cached (the next "
            "`lab run` resumes an unfinished run from its checkpoint)",
        )
        self.signum = signum
        self.exit_code = 130 if signum == signal.SIGINT else 143


def _worker_init(stop) -> None:
    """Pool worker start-up: remember the stop Event, and defer Ctrl-C and SIGTERM
    (:func:`moelab.signals.defer_signals`): one that arrives between runs, or between the
    segments of a snapshotted run, stops the next training after its first step, with a
    checkpoint. A training run installs its own handlers, which finish the step and save; the
    parent forwards the stop as SIGTERM and escalates with SIGKILL. A worker forked after the
    stop would otherwise run the parent's handler, inherited by the fork, and print its
    traceback."""
    global _STOP
    _STOP = stop
    defer_signals()


def _pool_job(cfg, snapshots: int, nproc: int, weights: bool = False, record: bool = False):
    """One pretrain job in a worker (``weights``: retrain a run kept only as a record;
    ``record``: keep the finished run's record); skipped once the lab is stopping."""
    from moelab.lab import runner

    if (_STOP is not None and _STOP.is_set()) or stop_pending() is not None:
        return None
    return runner.train_cached(
        cfg, snapshots=snapshots, nproc=nproc, weights=weights, record=record
    )


class _PoolStop:
    signum: int | None = None


@contextmanager
def _stop_pool_on_signals(pool, stop) -> Iterator[_PoolStop]:
    """While the body runs, SIGINT / SIGTERM set ``stop`` (no worker starts another run) and
    send SIGTERM to every worker (a training run ends after its step); a second signal
    kills the workers at once. The caller raises :class:`LabStopped` when the pool is done."""
    flag = _PoolStop()

    def handle(signum, frame) -> None:
        first = flag.signum is None
        flag.signum = flag.signum or signum
        stop.set()
        for pid in list((getattr(pool, "_processes", None) or {}).keys()):
            try:
                os.kill(pid, signal.SIGTERM if first else signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not first:
            raise LabStopped(flag.signum)

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def rescore_result(exp: Experiment, path: Path) -> dict[str, Any]:
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
    _write_json(path, res)
    return res


def run_suite(
    names: list[str],
    *,
    jobs: int = 1,
    quick: bool = False,
    decisive: bool = False,
    seeds: int | None = None,
    out: str | None = None,
    variants: str | None = None,
    cached_only: bool = False,
    rescore: bool = False,
    pretrain_only: bool = False,
    threads: int = 0,
) -> None:
    """``moelab lab run``: train (in ``jobs`` processes), analyse and judge the experiments
    ``names`` (suite names or .toml paths), printing each verdict and its checks.

    SIGINT / SIGTERM end it with :class:`LabStopped` (one line in the CLI), the runs finished
    so far cached and result.json as it was or complete (written atomically)."""

    def on_term(signum, frame) -> None:  # outside a training run (which has its own)
        raise LabStopped(signum)

    opts = dict(jobs=jobs, quick=quick, decisive=decisive, seeds=seeds, out=out)
    opts |= dict(variants=variants, cached_only=cached_only, rescore=rescore, threads=threads)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_term) if main else None
    try:
        _run_suite(names, pretrain_only=pretrain_only, **opts)
    except LabStopped:
        raise
    except Interrupted as exc:  # a training run in this process stopped after its step
        raise LabStopped(signal.SIGINT if exc.exit_code == 130 else signal.SIGTERM) from exc
    except KeyboardInterrupt:
        raise LabStopped(signal.SIGINT) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _check_suite_options(
    seeds: int | None, jobs: int, quick: bool, decisive: bool, cached_only: bool, pretrain: bool
) -> None:
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds={seeds}: allowed: an integer >= 1")
    if jobs < 1:
        raise ValueError(f"--jobs={jobs}: allowed: an integer >= 1")
    if quick and decisive:
        raise ValueError("--quick and --decisive exclude each other; give one")
    if cached_only and pretrain:
        raise ValueError("--cached-only and --pretrain-only exclude each other; give one")


def _run_suite(
    names: list[str],
    *,
    jobs: int,
    quick: bool,
    decisive: bool,
    seeds: int | None,
    out: str | None,
    variants: str | None,
    cached_only: bool,
    rescore: bool,
    pretrain_only: bool,
    threads: int,
) -> None:
    _check_suite_options(seeds, jobs, quick, decisive, cached_only, pretrain_only)
    exps = [load_experiment(n) for n in names]
    exps = [with_threads(e, threads) for e in exps]
    if rescore:
        for exp in exps:
            path = Path(out or f"results/{exp.name}") / "result.json"
            if not path.exists():
                raise ValueError(f"--rescore: no {path} to re-apply the checks to")
            print(f"{exp.name}: {rescore_result(exp, path)['verdict']}")
        return
    if out and len(exps) > 1:
        raise ValueError("--out needs a single experiment name")
    plan = [(e, _variants(e, variants, quick)) for e in exps]
    folders = {e.name: Path(out or default_out(e, quick, decisive)) for e in exps}
    for folder in folders.values():  # a result folder holds result.json and plots only
        check_output_folder(folder, "lab run", ("result.json", "*.png"), create=False)
    if (jobs > 1 and not cached_only) or pretrain_only:  # --cached-only trains nothing
        pretrain(plan, quick=quick, seeds=seeds, workers=jobs, decisive=decisive)
    if pretrain_only:
        return
    for exp, chosen in plan:
        folder = folders[exp.name]
        res = run_experiment(
            exp,
            folder,
            quick=quick,
            seeds=seeds,
            variants=chosen,
            cached_only=cached_only,
            decisive=decisive,
        )
        print(f"{exp.name}: {res['verdict']} ({res['wall_seconds']} s) -> {folder / 'result.json'}")
        for c in res["checks"]:
            print(f"  [{'x' if c['passed'] else ' '}] {c['check']}: {c['lhs']} vs {c['bound']}")
