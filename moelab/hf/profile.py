"""``moelab profile``: how the routers of a transformers MoE model behave on the user's text.

Runs the text through the model in eval mode without gradients, records every router's own
expert choices with forward hooks (:func:`moelab.hf.routers.capture_routing`), and writes
``DIR/profile.json`` (one object per MoE layer: counts, MaxVio, CV, dead and rare experts,
routing entropy, co-activation, per-domain expert frequency and domain/expert mutual information),
``DIR/coactivation.npy`` (layers × E × E) and two plots (load heatmap, dead-expert map).

Shape legend: T tokens, K top-k, E experts, D domains, N layers, B sequences, L sequence length.
"""

from __future__ import annotations

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
from moelab.hf.routers import RouterSite, capture_routing, find_routers, model_inputs
from moelab.hf.status import balancing_status, summary
from moelab.hf.text import batches, domain_stream, load_domains, model_tokenizer
from moelab.routing import score_fn

COACT_CHUNK = 4096  # tokens per coactivation call: bounds the (T, E) one-hot memory


DTYPES = ("auto", "float32", "bfloat16", "float16")
PROFILE_FILES = ("profile.json", "coactivation.npy", "load_heatmap.png", "dead_experts.png")


def check_device(name: str | None) -> None:
    """Refuse a ``--device`` torch does not know or this machine does not have, in one line."""
    if name is None:
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"--device {name!r} is not a device; allowed: cpu, cuda, cuda:N, mps"
        ) from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available}
    available["mps"] = torch.backends.mps.is_available
    if not available.get(dev.type, lambda: False)():
        raise ValueError(f"--device {name!r}: no {dev.type} device is available here; allowed: cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


AUTO_CLASSES = (
    "AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForSeq2SeqLM", "AutoModel",
)  # fmt: skip


def _config_class(name_or_path: str) -> type | None:
    """The model class named in the checkpoint's config (``architectures[0]``), if importable."""
    import transformers
    from transformers import AutoConfig

    try:
        archs = AutoConfig.from_pretrained(name_or_path).architectures or []
    except (OSError, ValueError):
        return None
    return next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)


def load_model(name_or_path: str, *, device: str = "cpu", dtype: str = "auto") -> nn.Module:
    """Any MoE checkpoint (a save_pretrained folder, or a hub name when online): the class
    named in its config, else the causal-LM, image-text, seq2seq and base auto classes in turn."""
    import transformers

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not allowed; choose one of {list(DTYPES)}")
    check_device(None if device == "auto" else device)
    dev = resolve_device(device, "--device")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    classes = [_config_class(name_or_path)] + [getattr(transformers, a) for a in AUTO_CLASSES]
    first = None
    for cls in (c for c in classes if c is not None):
        try:
            return cls.from_pretrained(name_or_path, dtype=torch_dtype).to(dev)
        except (OSError, ValueError, KeyError) as exc:
            first = first or exc
    text = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
    raise ValueError(f"cannot load model {name_or_path!r}: {text}") from first


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

    def add(self, logits_TC: Tensor, experts_TK: Tensor, domain: int) -> None:
        """Keep one router call's choices and score sums on the model's device (no host sync).

        logits_TC: the recorded tensor over all C = E + N columns (null experts included),
        scored with the family's own score function (probabilities are kept as they are)."""
        T, C = logits_TC.shape
        small = torch.uint8 if C < 255 else torch.int16  # T·K ids without 8 bytes each
        self.experts.append(experts_TK.to(small))
        self.domains.append(torch.full((T,), domain, dtype=torch.int32, device=logits_TC.device))
        if self.site.probs_recorded:
            scores_TE = logits_TC.float()
        else:
            scores_TE = score_fn(logits_TC.float(), self.site.score)
        p_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-30)
        p_sum_E = p_TE.sum(0).double()
        self.prob_sum_E = p_sum_E if self.prob_sum_E is None else self.prob_sum_E + p_sum_E
        self.token_entropy_sum = self.token_entropy_sum - torch.special.xlogy(p_TE, p_TE).sum()


def _coactivation(experts_TK: Tensor, keep_TK: Tensor, num_experts: int) -> Tensor:
    """metrics.coactivation summed over chunks of tokens: (T, K) -> (E, E) int64 (slots with
    ``keep_TK`` False left out)."""
    total_EE = torch.zeros(num_experts, num_experts, dtype=torch.int64)
    for start in range(0, experts_TK.shape[0], COACT_CHUNK):
        chunk = slice(start, start + COACT_CHUNK)
        total_EE += metrics.coactivation(experts_TK[chunk], num_experts, mask=keep_TK[chunk])
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


def _choices(rec: LayerRecord) -> tuple[Tensor, Tensor]:
    """(experts_TK int64, domains_T) of everything recorded; empty for a router never called."""
    if not rec.experts:
        return torch.zeros(0, rec.site.top_k, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(rec.experts).cpu().long(), torch.cat(rec.domains).cpu().long()


def _null_stats(experts_TK: Tensor, site: RouterSite) -> dict[str, Any]:
    """Slots that went to null / identity experts (ids E..C-1) or were dropped (id C)."""
    E, C = site.num_experts, site.columns
    return {
        "num_null_experts": site.num_null,
        "null_slots": int(((experts_TK >= E) & (experts_TK < C)).sum()),
        "dropped_slots": int((experts_TK >= C).sum()),
    }


def layer_stats(rec: LayerRecord, domain_names: list[str], rare_frac: float) -> dict[str, Any]:
    """The JSON object of one MoE layer (see docs/hf.md for every field). Counts, MaxVio, CV
    and co-activation are over the E real experts; null-expert and dropped slots apart."""
    site, E = rec.site, rec.site.num_experts
    experts_TK, domains_T = _choices(rec)
    T = experts_TK.shape[0]
    real_TK = experts_TK < E
    ids_TK = experts_TK.clamp(max=E - 1)
    counts_E = metrics.expert_counts(ids_TK, E, mask=real_TK)
    dead_E = metrics.dead_experts(counts_E) if T else torch.zeros(E, dtype=torch.bool)
    rare_E = metrics.dead_experts(counts_E, threshold=rare_frac) & ~dead_E
    share = metrics.load_share(counts_E)
    coact_EE = _coactivation(ids_TK, real_TK, E)
    C = site.columns
    mean_p_C = rec.prob_sum_E.cpu() / max(T, 1) if rec.prob_sum_E is not None else torch.zeros(C)
    stats: dict[str, Any] = {
        "layer": site.layer,
        "module": site.name,
        "router_class": type(site.module).__name__,
        "num_experts": E,
        "top_k": site.top_k,
        "score": site.score,
        "tokens": T,
        "counts": counts_E.tolist(),
        **_null_stats(experts_TK, site),
        "maxvio": float(metrics.max_violation(counts_E)),
        "cv": float(metrics.cv(counts_E)),
        "load_share": {"min": float(share.min), "max": float(share.max), "uniform": 1 / E},
        "dead_experts": torch.nonzero(dead_E).flatten().tolist(),
        "rare_experts": torch.nonzero(rare_E).flatten().tolist(),
        "routing_entropy": {
            "token": float(rec.token_entropy_sum) / max(T, 1),
            "batch": float(metrics.routing_entropy(mean_p_C[None]).token) if T else 0.0,
            "max": math.log(C),
        },
        "mean_scores": mean_p_C[:E].tolist(),
        "coactivation_top_pairs": _top_pairs(coact_EE, counts_E, T),
    }
    if len(domain_names) > 1:
        D = len(domain_names)
        freq_DE = metrics.domain_expert_freq(domains_T, ids_TK, D, E, mask=real_TK)
        stats["domain_expert_freq"] = dict(zip(domain_names, freq_DE.tolist(), strict=True))
        stats["domain_expert_mi_bits"] = metrics.mutual_information(
            domains_T, ids_TK, D, E, mask=real_TK
        )
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
    sites: list[RouterSite] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Profile the routers of ``model`` on token streams, one per domain.

    streams: domain name -> ``(N,)`` int64 token ids. Returns (profile dict, coactivation
    ``(layers, E, E)`` int64 array). The model is put in eval mode for the run and restored.
    sites: the routers (default: :func:`find_routers`, one probe forward).
    """
    sites = find_routers(model) if sites is None else sites
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
                model(**model_inputs(model, ids_BL.to(device)))
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
            "family": sites[0].family.name if sites[0].family else None,
            "rule": "registry" if sites[0].family else ("inferred" if sites[0].inferred else None),
            "capture": "forward hooks on the router modules (the model's own expert indices)",
        },
        "balancing": balancing_status(model, sites),
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


# ----------------------------------------------------------------------------- checks


def check_profile_options(
    out: str,
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None,
    rare_frac: float,
    dtype: str,
    device: str | None,
) -> None:
    """Every ``moelab profile`` option and ``out`` checked before the model is loaded."""
    from moelab.config import check_range
    from moelab.runfolder import check_output_folder

    sizes = {"--seq-len": seq_len, "--batch-size": batch_size}
    if max_tokens is not None:
        sizes["--max-tokens"] = max_tokens
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} {value} is out of range; allowed: >= 1")
    check_range("--rare-frac", rare_frac, lo=0, hi=1)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not allowed; choose one of {list(DTYPES)}")
    check_device(device)
    check_output_folder(out, "profile", PROFILE_FILES)


def report_lines(result: dict[str, Any]) -> list[str]:
    """A profile's balancing status and one line per router layer, for the CLI."""
    lines = summary(result["balancing"])
    for lay in result["layers"]:
        lines.append(
            f"layer {lay['layer']:3d}  maxvio {lay['maxvio']:.3f}  cv {lay['cv']:.3f}  "
            f"dead {len(lay['dead_experts'])}  rare {len(lay['rare_experts'])}"
        )
    return lines
