"""Analyses beyond the per-variant table, one function per experiment kind.

Each takes ``{variant: [run folder per seed]}`` plus the experiment and returns
``(numbers, figures)``: a JSON-friendly dict merged into ``result.json`` under ``analysis`` and
``{file stem: matplotlib Figure}``. Legend: T tokens, K slots, E experts, N chunks, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moelab import metrics
from moelab.evaluate import evaluate
from moelab.inspect import load_trained
from moelab.lab import plots
from moelab.lab.runner import collect, route_stream, run_computation_batch, val_stream
from moelab.lab.spec import build_arm_config
from moelab.logs import read_rows
from moelab.runs import sampling_maxvio

Runs = dict[str, list[Path]]


def chunk_curve(
    layers: list[tuple[Tensor, Tensor | None]], E: int, sizes: list[int]
) -> list[float]:
    """Mean over layers and chunks of MaxVio of consecutive chunks of each size."""
    out = []
    for c in sizes:
        vals = [float(metrics.maxvio_by_chunks(e, E, c, mask=m).mean()) for e, m in layers]
        out.append(sum(vals) / len(vals))
    return out


def _routed(run_dir: Path, max_tokens: int = 0):
    """The trained run, its validation stream (``max_tokens``; 0 = the default 32,768) and
    the stream's routing per layer."""
    run = load_trained(run_dir)
    tokens_BL = val_stream(run.corpus, run.cfg, max_seqs=max_tokens // run.cfg.data.seq_len)
    return run, tokens_BL, route_stream(run.model, tokens_BL)


# ----------------------------------------------------------------------------- kinds


def chunks(exp, runs: Runs) -> tuple[dict, dict]:
    """Wang et al. Fig. 5: MaxVio of trained models on chunks of 2^6 … ``chunk_max`` tokens of
    a ``chunk_val_tokens`` validation stream (at least 4 chunks of the largest size); the curve
    is the mean over seeds (``*_std``: the spread over seeds, ``*_values``: per seed), ``fall``
    = MaxVio at the largest chunk / at a 16× smaller one, per seed, then averaged."""
    res: dict[str, Any] = {}
    sizes: list[int] = []
    stream = int(exp.options.get("chunk_val_tokens", 32768))
    top = int(exp.options.get("chunk_max", 16384))
    for name, dirs in runs.items():
        if name in _rank_variants(exp):
            continue  # trained for the rank scaling below, not for the chunk curve
        curves = []
        for d in dirs:
            run, tokens_BL, layers = _routed(d, stream)
            T, E, K = tokens_BL.numel(), run.cfg.model.moe.num_experts, run.cfg.model.moe.top_k
            sizes = [2**p for p in range(6, 20) if 2**p <= min(top, T // 4)]
            curves.append(chunk_curve(layers, E, sizes))
        c_SN = np.array(curves)
        fall_S, curve = c_SN[:, -1] / np.maximum(c_SN[:, -5], 1e-9), c_SN.mean(0)
        res[name] = {
            "curve": curve.tolist(),
            "curve_std": c_SN.std(0).tolist(),
            "fall": float(fall_S.mean()),  # mean of the per-seed falls (their noise model)
            "fall_std": float(fall_S.std()),
            "fall_values": fall_S.tolist(),
            "at_max": float(curve[-1]),
            "at_max_values": c_SN[:, -1].tolist(),
            "at_max_std": float(c_SN[:, -1].std()),
            "seeds": len(dirs),
        }
    if not sizes:
        raise ValueError(f"no chunk-curve arm among the runs found ({sorted(runs)})")
    res["sizes"] = sizes
    res["reference"] = [sampling_maxvio(n, E, K) for n in sizes]
    res["reference_fall"] = res["reference"][-1] / res["reference"][-5]
    figs = {"chunks": plots.chunk_plot(res)}
    groups = exp.options.get("rank_scaling", {})
    if any(v in runs for vs in groups.values() for v in vs):
        res["ranks"] = rank_scaling(runs, groups, E, K)
        figs["ranks"] = plots.chunk_plot(res["ranks"], ylabel="MaxVio_batch in training")
    return res, figs


def _rank_variants(exp) -> set[str]:
    return {v for vs in exp.options.get("rank_scaling", {}).values() for v in vs}


def rank_scaling(runs: Runs, groups: dict[str, list[str]], E: int, K: int) -> dict[str, Any]:
    """Seed 003, the real thing: MaxVio_batch logged in training (last 25 % of steps) of runs
    with 1, 2, 4 … ranks and a fixed per-rank micro-batch, against their computation batch
    (tokens per micro-batch × ranks). ``fall`` = last / first of each group, per seed
    (``fall_values``: seed s of the most ranks over seed s of the fewest), then averaged, as
    :func:`chunks` does; ``curve`` is the mean over seeds (``curve_std`` the spread)."""
    res: dict[str, Any] = {}
    for group, names in groups.items():
        names = [n for n in names if n in runs]
        per_seed = [[collect(d)["maxvio_batch_tail"] for d in runs[n]] for n in names]
        S = min(map(len, per_seed))
        c_SW = np.array([v[:S] for v in per_seed]).T  # (seeds, rank counts), in seed order
        fall_S = c_SW[:, -1] / np.maximum(c_SW[:, 0], 1e-9)
        res[group] = {
            "variants": names,
            "curve": c_SW.mean(0).tolist(),
            "curve_std": c_SW.std(0).tolist(),
            "fall": float(fall_S.mean()),
            "fall_values": fall_S.tolist(),
            "sizes": [run_computation_batch(runs[n][0]) for n in names],
            "seeds": S,
        }
        res.setdefault("sizes", res[group]["sizes"])  # the first group's: the reference's
    res["reference"] = [sampling_maxvio(n, E, K) for n in res["sizes"]]
    res["reference_fall"] = res["reference"][-1] / res["reference"][0]
    return res


def scope(exp, runs: Runs) -> tuple[dict, dict]:
    """Domain specialisation heatmaps and balance by domain, per arm over seeds (``X_values``):
    ``in_domain_maxvio`` (MaxVio of each training domain's routing), ``holdout_maxvio`` (of the
    held-out domain's), ``seen_maxvio_global`` (MaxVio of the training domains' pooled routing,
    without the held-out domain's counts) and ``by_domain`` MaxVio. With ``holdout_reference``
    (an arm trained on every domain), ``holdout_gap`` per seed = mean over the arms that hold
    a domain out of (its MaxVio held out − the same domain's MaxVio in the reference arm)."""
    res: dict[str, Any] = {}
    heat = {}
    for name, dirs in runs.items():
        per_seed = [_domain_balance(d) for d in dirs]
        heat[name] = per_seed[0].pop("_heat")
        for p in per_seed[1:]:
            p.pop("_heat")
        res[name] = {"seeds": len(dirs), "by_domain": per_seed[0]["by_domain"]}
        res[name] |= _seed_means(
            per_seed, ("in_domain_maxvio", "holdout_maxvio", "seen_maxvio_global")
        )
        res[name]["_per_seed"] = per_seed
    ref = exp.options.get("holdout_reference") if hasattr(exp, "options") else None
    if ref in res:
        gap = _holdout_gap(res, ref)
        if gap:
            res["holdout_gap"], res["holdout_gap_values"] = float(np.mean(gap)), gap
    for r in res.values():
        if isinstance(r, dict):
            r.pop("_per_seed", None)
    return res, {"domain_heatmaps": plots.heatmaps(heat)}


def _domain_balance(run_dir: Path) -> dict[str, Any]:
    ev = [r for r in read_rows(run_dir / "metrics.jsonl") if "domain_freq_layers" in r][-1]
    cfg = json.loads((run_dir / "config.json").read_text())
    domains = [k.split("/", 1)[1] for k in ev if k.startswith("val_loss/")]
    freq_LDE = torch.tensor(ev["domain_freq_layers"], dtype=torch.float64)
    hold = [domains.index(h) for h in cfg["data"]["holdout_domains"] if h in domains]
    seen = [i for i in range(len(domains)) if i not in hold]
    mv_D = metrics.max_violation(freq_LDE).mean(0)  # (D,) MaxVio of each domain's routing
    return {
        "by_domain": dict(zip(domains, mv_D.tolist(), strict=True)),
        "held_out": [domains[i] for i in hold],
        "in_domain_maxvio": float(mv_D[seen].mean()),
        "holdout_maxvio": float(mv_D[hold].mean()) if hold else None,
        "seen_maxvio_global": float(metrics.max_violation(freq_LDE[:, seen].mean(1)).mean()),
        "_heat": (domains, freq_LDE[-1].numpy()),
    }


def _holdout_gap(res: dict[str, Any], ref: str) -> list[float]:
    """Per seed: mean over hold-out arms of MaxVio(domain held out) − MaxVio(domain trained)."""
    arms = [r for n, r in res.items() if n != ref and r["_per_seed"][0]["held_out"]]
    n = min([len(res[ref]["_per_seed"]), *(len(a["_per_seed"]) for a in arms)]) if arms else 0
    gaps = []
    for s in range(n):
        trained = res[ref]["_per_seed"][s]["by_domain"]
        diffs = [
            a["_per_seed"][s]["by_domain"][d] - trained[d]
            for a in arms
            for d in a["_per_seed"][s]["held_out"]
            if d in trained
        ]
        if diffs:
            gaps.append(float(np.mean(diffs)))
    return gaps


def batch_size(exp, runs: Runs) -> tuple[dict, dict]:
    """Seed 000 per arm, over seeds (``X_values`` per seed): f_i spread and drop rate at CF 1.25
    on chunks of the arm's batch, the drop rate at CF 1.25 on 1,024-token chunks (one size for
    every arm), router-gradient noise at the arm's batch, and routing fluctuation (seed 0)."""
    res: dict[str, Any] = {}
    for name, dirs in runs.items():
        per_seed = [_batch_numbers(d) for d in dirs]
        res[name] = {**per_seed[0], **fluctuation_numbers(dirs[0]), "seeds": len(dirs)}
        keys = ("f_spread", "drop_cf125", "drop_cf125_1k", "grad_cos", "grad_rel_var")
        res[name] |= _seed_means(per_seed, keys)
    return res, {"batch_size": plots.batch_plot(res)}


def _batch_numbers(run_dir: Path) -> dict[str, Any]:
    run, tokens_BL, layers = _routed(run_dir)
    B, L = run.cfg.train.batch_size, run.cfg.data.seq_len
    E, K = run.cfg.model.moe.num_experts, run.cfg.model.moe.top_k
    n = min(B * L, tokens_BL.numel() // 2)
    return {
        "batch_tokens": B * L,
        "tokens_per_expert": B * L * K / E,
        "f_spread": _f_spread(layers, E, K, n),
        "drop_cf125": _drop_at_cf(layers, E, K, n, 1.25),
        "drop_cf125_1k": _drop_at_cf(layers, E, K, 1024, 1.25),
        **_grad_noise(run.model, tokens_BL, min(B, len(tokens_BL) // 2)),
        "reference_maxvio": sampling_maxvio(n, E, K),
    }


def _seed_means(per_seed: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """``{key: mean over seeds, key_values: per-seed values}`` for every key some seed has (the
    per-seed values are the checks' noise model)."""
    out: dict[str, Any] = {}
    for key in keys:
        vals = [p[key] for p in per_seed if p.get(key) is not None]
        if vals:
            out |= {key: float(np.mean(vals)), f"{key}_values": vals}
    return out


def _chunk_counts(experts_TK: Tensor, mask_TK: Tensor | None, E: int, n: int) -> Tensor:
    """(N, E) slot counts of each run of n consecutive tokens (last partial chunk dropped)."""
    N = experts_TK.shape[0] // n
    ids_NS = experts_TK[: N * n].reshape(N, -1)
    w_NS = torch.ones_like(ids_NS) if mask_TK is None else mask_TK[: N * n].reshape(N, -1).long()
    return torch.zeros(N, E, dtype=torch.int64).scatter_add_(1, ids_NS, w_NS)


def _f_spread(layers, E: int, K: int, n: int) -> float:
    """Std over chunks of the load fraction f_i = E·c_i/(K·n), mean over experts and layers."""
    vals = []
    for e, m in layers:
        counts_NE = _chunk_counts(e, m, E, n).double()
        vals.append(float((counts_NE * E / (K * n)).std(0).mean()))
    return sum(vals) / len(vals)


def _drop_at_cf(layers, E: int, K: int, n: int, cf: float) -> float:
    """Share of slots over capacity ceil(n·K/E·CF) per chunk of n tokens (no training change)."""
    cap = math.ceil(n * K / E * cf)
    over = total = 0
    for e, m in layers:
        counts_NE = _chunk_counts(e, m, E, n)
        over += int((counts_NE - cap).clamp_min(0).sum())
        total += int(counts_NE.sum())
    return over / max(total, 1)


def _grad_noise(model, tokens_BL: Tensor, batch: int, n_batches: int = 6) -> dict[str, float]:
    """Router-gradient noise: relative variance and cosine of consecutive batches' gradients."""
    model.train()
    grads = []
    for i in range(n_batches):
        x = tokens_BL[i * batch : (i + 1) * batch]
        if len(x) < batch:
            break
        model.zero_grad()
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        g = [
            p.grad.flatten()
            for n, p in model.named_parameters()
            if "router" in n and p.grad is not None
        ]
        grads.append(torch.cat(g).clone())
    model.zero_grad()
    model.eval()
    if len(grads) < 2:
        return {}
    G = torch.stack(grads)
    cos = [
        float(torch.nn.functional.cosine_similarity(G[i], G[i + 1], 0)) for i in range(len(G) - 1)
    ]
    rel_var = float(G.var(0).sum() / G.mean(0).pow(2).sum().clamp_min(1e-12))
    return {"grad_cos": float(np.mean(cos)), "grad_rel_var": rel_var}


def fluctuation_numbers(run_dir: Path) -> dict[str, Any]:
    """StableMoE last-change step fractions and OLMoE saturation from the run's snapshots."""
    path = run_dir / "snapshots.pt"
    if not path.exists():
        return {}
    snap = torch.load(path)
    steps, experts = snap["steps"], snap["experts"]  # experts[snapshot][layer] (T, K)
    out: dict[str, Any] = {"snapshot_steps": steps}
    lasts = [
        metrics.last_change_step([s[j] for s in experts], steps) for j in range(len(experts[0]))
    ]
    last_T = torch.cat(lasts)
    for f in (0.2, 0.5, 0.8):
        out[f"changed_after_{int(f * 100)}"] = metrics.fraction_changed_after(last_T, steps, f)
    out["saturation"] = [
        float(np.mean([metrics.router_saturation(s[j], experts[-1][j]) for j in range(len(s))]))
        for s in experts
    ]
    out["last_change_hist"] = [float((last_T == s).double().mean()) for s in steps]
    return out


def fluctuation(exp, runs: Runs) -> tuple[dict, dict]:
    """Per arm: seed 0's snapshot curves, and ``changed_after_*`` averaged over seeds with the
    per-seed ``*_values`` (the checks' noise model)."""
    res = {}
    for name, dirs in runs.items():
        per_seed = [fluctuation_numbers(d) for d in dirs]
        res[name] = {**per_seed[0], "seeds": len(dirs)}
        keys = ("changed_after_20", "changed_after_50", "changed_after_80")
        res[name] |= _seed_means(per_seed, keys)
    return res, {"fluctuation": plots.fluctuation_plot(res)}


def leakage(exp, runs: Runs) -> tuple[dict, dict]:
    """Wang et al. §5.2: val loss when the MoE layers route chunks of c tokens, in sequence
    order (``contig``), after a fixed shuffle of tokens across the batch (``shuffled``) or
    whole; per arm averaged over seeds (``X_values`` per seed). With the generated
    ``synthetic_uniform`` domain in the data, ``synthetic_nats_per_char`` is the in-order
    chunked loss on its validation split in nats per character: below ``synthetic_bound``
    (its entropy, which no causal model can beat) it proves leakage."""
    from moelab.data import SYNTHETIC_NATS_PER_CHAR

    chunk = int(exp.options.get("eval_chunk", 64))
    res: dict[str, Any] = {"chunk": chunk, "synthetic_bound": SYNTHETIC_NATS_PER_CHAR}
    for name, dirs in runs.items():
        per_seed = [_leakage_numbers(d, chunk, int(exp.options.get("eval_seqs", 64))) for d in dirs]
        res[name] = {"seeds": len(dirs), **_seed_means(per_seed, tuple(per_seed[0]))}
    return res, {"leakage": plots.leakage_plot(res)}


def _leakage_numbers(run_dir: Path, chunk: int, seqs: int) -> dict[str, float]:
    run = load_trained(run_dir)
    tokens_BL = val_stream(run.corpus, run.cfg, max_seqs=seqs)
    out = {
        m: _chunked_loss(run.model, tokens_BL, chunk, m) for m in ("contig", "shuffled", "whole")
    }
    out["shuffle_gap"] = out["shuffled"] - out["contig"]
    synth = run.corpus.val.get("synthetic_uniform")
    if synth is not None:
        L = run.cfg.data.seq_len
        n = min(seqs, (len(synth) - 1) // L)
        x_BL = torch.from_numpy(synth[: n * L].astype(np.int64).reshape(n, L))
        tokens_per_char = len(synth) / len(run.corpus.decode(synth))
        for m in ("contig", "whole"):
            out[f"synthetic_nats_per_char_{m}"] = (
                _chunked_loss(run.model, x_BL, chunk, m) * tokens_per_char
            )
        out["synthetic_nats_per_char"] = out["synthetic_nats_per_char_contig"]
    return out


@torch.no_grad()
def _chunked_loss(model, tokens_BL: Tensor, chunk: int, mode: str) -> float:
    """Next-token loss with every MoE layer routing groups of ``chunk`` tokens."""
    originals = []
    for layer in model.moe_layers:
        originals.append(layer.forward)
        if mode != "whole":
            layer.forward = _chunked_forward(layer.forward, chunk, shuffle=mode == "shuffled")
    try:
        x = tokens_BL
        out = model(x[:, :-1], x[:, 1:])
        return float(out.loss)
    finally:
        for layer, f in zip(model.moe_layers, originals, strict=True):
            layer.forward = f


def _chunked_forward(forward, chunk: int, *, shuffle: bool):
    def wrapped(x: Tensor, **kw):
        D = x.shape[-1]
        x_TD = x.reshape(-1, D)
        T = x_TD.shape[0]
        perm = (
            torch.randperm(T, generator=torch.Generator().manual_seed(0))
            if shuffle
            else torch.arange(T)
        )
        ids = kw.get("token_ids")
        ids_T = None if ids is None else ids.reshape(-1)[perm]
        outs, first = [], None
        for s in range(0, T, chunk):
            sl = perm[s : s + chunk]
            o = forward(x_TD[sl], token_ids=None if ids_T is None else ids_T[s : s + chunk])
            first = first or o
            outs.append(o.output)
        y_TD = torch.empty_like(x_TD)
        y_TD[perm] = torch.cat(outs)
        return dataclasses.replace(first, output=y_TD.reshape(x.shape))

    return wrapped


def extra_evals(exp, runs: Runs) -> dict[str, Any]:
    """``eval_overrides``: re-evaluate each final model under other settings (e.g. dropless)."""
    spec = exp.options.get("eval_overrides", {})
    res: dict[str, Any] = {}
    for name, dirs in runs.items():
        for label, overrides in spec.items():
            vals = []
            for d in dirs:
                run = load_trained(d)
                cfg = build_arm_config(json.loads((d / "config.json").read_text()), overrides)
                model = type(run.model)(cfg.model)
                model.load_state_dict(run.model.state_dict())
                ev = evaluate(
                    model,
                    run.corpus,
                    batch_size=cfg.train.batch_size,
                    seq_len=cfg.data.seq_len,
                    max_tokens=cfg.train.eval_max_tokens,
                )
                vals.append(ev["val_loss"])
            res.setdefault(name, {})[f"val_loss_{label}"] = vals  # per seed
    return res


NOISE_METRICS = ("val_loss", "maxvio_global", "maxvio_batch_tail", "dead_val")


def noise(exp, runs: Runs) -> tuple[dict, dict]:
    """The lab's noise model (issue 15 §2): per arm and run length the sample SD over seeds of
    each metric in ``NOISE_METRICS``, the SD pooled over arms (root mean square; ``sd[metric]
    [steps]``, what other experiments' MDE reads) and the MDE of a two-arm difference at 3 and
    8 seeds per arm."""
    from moelab.lab.stats import mde_from_sd

    per_arm: dict[str, Any] = {}
    by_len: dict[str, dict[str, list[float]]] = {}
    for name, dirs in runs.items():
        nums = [collect(d) for d in dirs]
        steps = str(nums[0]["steps"])
        per_arm[name] = {"steps": int(steps), "seeds": len(dirs)}
        for m in NOISE_METRICS:
            vals = [float(x[m]) for x in nums if isinstance(x.get(m), (int, float))]
            if len(vals) > 1:
                per_arm[name][m] = float(np.std(vals, ddof=1))
                by_len.setdefault(m, {}).setdefault(steps, []).append(per_arm[name][m])
    sd = {m: {L: float(np.sqrt(np.mean(np.square(v)))) for L, v in d.items()}
          for m, d in by_len.items()}  # fmt: skip
    mde = {m: {L: {n: mde_from_sd(v, n) for n in (3, 8)} for L, v in d.items()}
           for m, d in sd.items()}  # fmt: skip
    out = {"sd": sd, "per_arm": per_arm, "mde": mde, **_determinism()}
    return out, {"noise": plots.noise_plot(runs)}


def _determinism(path: Path = Path("results/noise/determinism.json")) -> dict[str, Any]:
    """The verdicts of ``scripts/determinism.py`` (same command twice, idle and under load, with
    MKL's dynamic threads on and off), when it has been run."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {"determinism": {k: v for k, v in rec.items() if not isinstance(v, dict)}}


_WEIGHTS = {"chunks", "leakage"}  # analysis kinds that route a stream through the model


def needs_weights(exp) -> bool:
    """Whether ``exp``'s analysis loads its runs' trained models (routes a validation stream
    or re-evaluates them), so a run kept only as a record (no checkpoint) must be retrained.
    Snapshotted runs need ``snapshots.pt``, which a record never holds (``runner.is_done``)."""
    return exp.analysis in _WEIGHTS or bool(exp.options.get("eval_overrides"))


KINDS = {
    "balance": None,
    "noise": noise,
    "chunks": chunks,
    "scope": scope,
    "batch_size": batch_size,
    "leakage": leakage,
    "fluctuation": fluctuation,
}
