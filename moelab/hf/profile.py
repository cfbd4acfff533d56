"""``moelab profile``: how the routers of a transformers MoE model behave on the user's text.

Runs the text through the model in eval mode without gradients, records every router's own
expert choices with forward hooks (:func:`moelab.hf.routers.capture_routing`), and writes
``DIR/profile.json`` (one object per MoE layer: counts, MaxVio, CV, dead and rare experts,
routing entropy, co-activation, per-domain expert frequency and domain/expert mutual information),
``DIR/coactivation.npy`` (layers × E × E) and two plots (load heatmap, dead-expert map).

Shape legend: T tokens, K top-k, E experts, D domains, N layers, B sequences, L sequence length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from moelab import metrics
from moelab.device import resolve as resolve_device
from moelab.hf.routers import RouterSite, capture_routing, find_routers
from moelab.hf.text import batches, domain_stream, load_domains, model_tokenizer
from moelab.routing import score_fn

COACT_CHUNK = 4096  # tokens per coactivation call: bounds the (T, E) one-hot memory


def load_model(name_or_path: str, *, device: str = "cpu", dtype: str = "auto") -> nn.Module:
    """AutoModelForCausalLM from a save_pretrained folder (or a hub name when online)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load model {name_or_path!r}: {first}") from exc
    return model.to(resolve_device(device, "--device"))


def default_device() -> str:
    """The device a command without ``--device`` uses: ``auto`` (:mod:`moelab.device`: CUDA
    when available, under torchrun this rank's ``LOCAL_RANK`` GPU)."""
    return "auto"


# ----------------------------------------------------------------------------- accumulation


@dataclass
class LayerRecord:
    """Everything kept about one router while the text runs through the model."""

    site: RouterSite
    experts: list[Tensor] = field(default_factory=list)  # (T, K) chunks, small int dtype
    domains: list[Tensor] = field(default_factory=list)  # (T,) chunks, int32
    prob_sum_E: Tensor | None = None  # Σ_t p_t, per-token routing distributions (float64)
    token_entropy_sum: Tensor | float = 0.0  # Σ_t H(p_t), nats

    def add(self, logits_TE: Tensor, experts_TK: Tensor, domain: int) -> None:
        """Keep one router call's choices and score sums on the model's device (no host sync)."""
        T, E = logits_TE.shape
        small = torch.uint8 if E <= 256 else torch.int16  # T·K ids without 8 bytes each
        self.experts.append(experts_TK.to(small))
        self.domains.append(torch.full((T,), domain, dtype=torch.int32, device=logits_TE.device))
        scores_TE = score_fn(logits_TE.float(), self.site.score)
        p_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-30)
        p_sum_E = p_TE.sum(0).double()
        self.prob_sum_E = p_sum_E if self.prob_sum_E is None else self.prob_sum_E + p_sum_E
        self.token_entropy_sum = self.token_entropy_sum - torch.special.xlogy(p_TE, p_TE).sum()


def _coactivation(experts_TK: Tensor, num_experts: int) -> Tensor:
    """metrics.coactivation summed over chunks of tokens: (T, K) -> (E, E) int64."""
    total_EE = torch.zeros(num_experts, num_experts, dtype=torch.int64)
    for start in range(0, experts_TK.shape[0], COACT_CHUNK):
        total_EE += metrics.coactivation(experts_TK[start : start + COACT_CHUNK], num_experts)
    return total_EE


def _top_pairs(coact_EE: Tensor, counts_E: Tensor, tokens: int, n: int = 10) -> list[dict]:
    """The n most frequent expert pairs, with lift = observed / expected-if-independent."""
    E = coact_EE.shape[0]
    i_P, j_P = torch.triu_indices(E, E, offset=1)
    pair_P = coact_EE[i_P, j_P]
    order = torch.argsort(pair_P, descending=True, stable=True)[:n]
    out = []
    for p in order.tolist():
        i, j, both = int(i_P[p]), int(j_P[p]), int(pair_P[p])
        if both == 0:
            break
        expected = float(counts_E[i]) * float(counts_E[j]) / max(tokens, 1)
        out.append({"experts": [i, j], "tokens": both, "lift": both / expected if expected else 0})
    return out


def layer_stats(rec: LayerRecord, domain_names: list[str], rare_frac: float) -> dict[str, Any]:
    """The JSON object of one MoE layer (see docs/hf.md for every field)."""
    site, E = rec.site, rec.site.num_experts
    experts_TK = torch.cat(rec.experts).cpu().long()
    domains_T = torch.cat(rec.domains).cpu().long()
    T = experts_TK.shape[0]
    counts_E = metrics.expert_counts(experts_TK, E)
    dead_E = metrics.dead_experts(counts_E) if T else torch.zeros(E, dtype=torch.bool)
    rare_E = metrics.dead_experts(counts_E, threshold=rare_frac) & ~dead_E
    share = metrics.load_share(counts_E)
    coact_EE = _coactivation(experts_TK, E)
    mean_p_E = rec.prob_sum_E.cpu() / max(T, 1)
    stats: dict[str, Any] = {
        "layer": site.layer,
        "module": site.name,
        "num_experts": E,
        "top_k": site.top_k,
        "score": site.score,
        "tokens": T,
        "counts": counts_E.tolist(),
        "maxvio": float(metrics.max_violation(counts_E)),
        "cv": float(metrics.cv(counts_E)),
        "load_share": {"min": float(share.min), "max": float(share.max), "uniform": 1 / E},
        "dead_experts": torch.nonzero(dead_E).flatten().tolist(),
        "rare_experts": torch.nonzero(rare_E).flatten().tolist(),
        "routing_entropy": {
            "token": float(rec.token_entropy_sum) / max(T, 1),
            "batch": float(metrics.routing_entropy(mean_p_E[None]).token),
            "max": math.log(E),
        },
        "mean_scores": mean_p_E.tolist(),
        "coactivation_top_pairs": _top_pairs(coact_EE, counts_E, T),
    }
    if len(domain_names) > 1:
        D = len(domain_names)
        freq_DE = metrics.domain_expert_freq(domains_T, experts_TK, D, E)
        stats["domain_expert_freq"] = dict(zip(domain_names, freq_DE.tolist(), strict=True))
        stats["domain_expert_mi_bits"] = metrics.mutual_information(domains_T, experts_TK, D, E)
    return stats, coact_EE


# ----------------------------------------------------------------------------- the profiler


@torch.no_grad()
def profile_model(
    model: nn.Module,
    streams: dict[str, Tensor],
    *,
    seq_len: int = 512,
    batch_size: int = 8,
    rare_frac: float = 0.1,
) -> tuple[dict[str, Any], np.ndarray]:
    """Profile the routers of ``model`` on token streams, one per domain.

    streams: domain name -> ``(N,)`` int64 token ids. Returns (profile dict, coactivation
    ``(layers, E, E)`` int64 array). The model is put in eval mode for the run and restored.
    """
    sites = find_routers(model)
    records = [LayerRecord(s) for s in sites]
    names = list(streams)
    current = {"domain": 0}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    on_route = lambda i, logits, experts: records[i].add(logits, experts, current["domain"])
    with capture_routing(sites, on_route):
        for d, name in enumerate(names):
            current["domain"] = d
            for ids_BL in batches(streams[name], seq_len, batch_size):
                model(input_ids=ids_BL.to(device), use_cache=False)
    elapsed = time.perf_counter() - start
    model.train(was_training)
    tokens = sum(int(s.numel()) for s in streams.values())
    layers, coacts = zip(*(layer_stats(r, names, rare_frac) for r in records), strict=True)
    config = model.config
    result = {
        "model": {
            "model_type": getattr(config, "model_type", None),
            "architecture": type(model).__name__,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None),
            "num_moe_layers": len(sites),
            "num_experts": sites[0].num_experts,
            "top_k": sites[0].top_k,
            "router_class": type(sites[0].module).__name__,
            "capture": "forward hooks on the router modules (the model's own expert indices)",
        },
        "tokens": tokens,
        "domains": {n: int(streams[n].numel()) for n in names},
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "rare_frac": rare_frac,
        "layers": list(layers),
    }
    return result, torch.stack(coacts).numpy() if len({c.shape for c in coacts}) == 1 else None


def plot_profile(result: dict[str, Any], out: Path) -> list[str]:
    """Load heatmap (load / mean per layer × expert) and dead-expert map, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    layers = result["layers"]
    counts_NE = np.array([lay["counts"] for lay in layers], dtype=float)
    rel_NE = counts_NE / np.maximum(counts_NE.mean(1, keepdims=True), 1e-12)
    status_NE = np.zeros_like(counts_NE)
    for n, lay in enumerate(layers):
        status_NE[n, lay["rare_experts"]] = 1
        status_NE[n, lay["dead_experts"]] = 2
    ylabels = [str(lay["layer"]) for lay in layers]
    files = []
    specs = [
        ("load_heatmap.png", rel_NE, "viridis", "expert load / mean load", None),
        (
            "dead_experts.png",
            status_NE,
            ListedColormap(["#dddddd", "#f0a030", "#c0182a"]),
            "status",
            ["active", "rare", "dead"],
        ),
    ]
    for fname, data_NE, cmap, label, ticks in specs:
        fig, ax = plt.subplots(
            figsize=(min(2 + 0.25 * data_NE.shape[1], 16), 1.5 + 0.3 * len(layers))
        )
        vmax = 2 if ticks else None
        im = ax.imshow(
            data_NE, aspect="auto", cmap=cmap, interpolation="nearest", vmin=0, vmax=vmax
        )
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), ylabels)
        bar = fig.colorbar(im, ax=ax, label=label)
        if ticks:
            bar.set_ticks([1 / 3, 1, 5 / 3], labels=ticks)
        ax.set_title(f"{result['model']['model_type']}: {label} ({result['tokens']} tokens)")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        files.append(fname)
    return files


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (tmp file + os.replace)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def profile(
    model: str,
    data: list[str],
    out: str | Path,
    *,
    max_tokens: int | None = None,
    seq_len: int = 512,
    batch_size: int = 8,
    rare_frac: float = 0.1,
    device: str | None = None,
    dtype: str = "auto",
    plots: bool = True,
) -> dict[str, Any]:
    """``moelab profile`` as a function: load, tokenise, profile, write ``out/profile.json``.

    max_tokens is split evenly over the domains (each ``data`` path is one domain).
    """
    net = load_model(model, device=device or default_device(), dtype=dtype)
    find_routers(net)  # fail fast, before reading the data, for a model without routers
    domains = load_domains(data)
    tokenize = model_tokenizer(model, net.config.vocab_size)
    share = None if max_tokens is None else max(1, math.ceil(max_tokens / len(domains)))
    streams = {d.name: domain_stream(d, tokenize, share) for d in domains}
    result, coact = profile_model(
        net, streams, seq_len=seq_len, batch_size=batch_size, rare_frac=rare_frac
    )
    result["model"]["path"] = str(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if coact is not None:
        np.save(out / "coactivation.npy", coact)
    result["plots"] = plot_profile(result, out) if plots else []
    write_json(out / "profile.json", result)
    return result


# ----------------------------------------------------------------------------- CLI


def add_profile_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``profile`` to a CLI's subparsers; the parser's default ``func`` is run_profile."""
    p = subparsers.add_parser("profile", help="profile the routers of a transformers MoE model")
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
    p.set_defaults(func=run_profile)
    return p


def run_profile(args: argparse.Namespace) -> int:
    """Run ``moelab profile`` from parsed arguments; prints a per-layer summary, returns 0."""
    result = profile(
        args.model,
        args.data,
        args.out,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        rare_frac=args.rare_frac,
        device=args.device,
        dtype=args.dtype,
        plots=not args.no_plots,
    )
    print(f"{result['tokens']} tokens, {result['tokens_per_s']:.0f} tokens/s -> {args.out}")
    for lay in result["layers"]:
        print(
            f"layer {lay['layer']:3d}  maxvio {lay['maxvio']:.3f}  cv {lay['cv']:.3f}  "
            f"dead {len(lay['dead_experts'])}  rare {len(lay['rare_experts'])}"
        )
    return 0
