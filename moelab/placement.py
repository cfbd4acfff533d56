"""Expert placement (EPLB-style) and an expert-parallel simulator; pure (no torch.distributed).

Legend: E experts, G devices (EP size), T tokens, K top-k, N MoE layers; a *replica* is one
physical copy of an expert on a device (hot experts may have several).

- ``contiguous_placement``: what ``moelab.parallel`` does, expert e on device e // (E/G)
  (G > E: every expert replicated G/E times, still contiguous).
- ``replicate`` + ``pack``: DeepSeek's EPLB in spirit: give the extra replica slots one by one
  to the expert with the highest load per replica, then pack replicas onto devices longest-
  processing-time first (Graham 1969), every device holding the same number of replicas.
- ``simulate_ep``: for routing traces (or bare counts) and EP sizes 1…256, the load of every
  device, MaxVio, straggler factor (max / mean device load) and the analytic all-to-all bytes:
  slots leaving their source device × d_model × bytes per element × 2 (dispatch + combine).
  Tokens are split over devices in contiguous equal shards (the EP data layout); a slot of an
  expert with r replicas goes to each replica with probability 1/r, so loads and bytes are
  expectations. Rebalanced placements are fitted on the first ``fit_fraction`` of the tokens
  and evaluated on the rest (like EPLB's placement from past load); both modes are evaluated
  on the same held-out tokens.

``moelab simulate-ep TRACE --out DIR`` writes the table (Markdown + JSON) and a plot; traces
come from ``save_traces`` (or ``--from-run RUN``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

TRACE_FORMAT = "moelab-routing-trace/1"
DEFAULT_EP_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


# ----------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """``hosts_GE[g, e]``: replicas of expert e on device g (G, E) int64."""

    hosts_GE: Tensor

    @property
    def replicas_E(self) -> Tensor:
        return self.hosts_GE.sum(0)

    def device_load(self, load_E: Tensor) -> Tensor:
        """(G,) load per device when each expert's load is split evenly over its replicas."""
        return self.hosts_GE.double() @ (load_E.double() / self.replicas_E.double())


def contiguous_placement(num_experts: int, num_devices: int) -> Placement:
    """Expert e on device e·G // E (G <= E), or device g holding expert g·E // G (G > E)."""
    E, G = num_experts, num_devices
    hosts = torch.zeros(G, E, dtype=torch.int64)
    if G <= E:
        hosts[torch.arange(E) * G // E, torch.arange(E)] = 1
    else:
        hosts[torch.arange(G), torch.arange(G) * E // G] = 1
    return Placement(hosts)


def replicate(load_E: Tensor, num_replicas: int) -> Tensor:
    """(E,) replicas per expert: one each, then each extra one to the expert with the highest
    load per replica (EPLB ``replicate_experts``). num_replicas >= E."""
    E = load_E.shape[0]
    if num_replicas < E:
        raise ValueError(f"num_replicas={num_replicas} must be >= the {E} experts")
    reps = torch.ones(E, dtype=torch.int64)
    load = load_E.double()
    for _ in range(num_replicas - E):
        reps[int(torch.argmax(load / reps))] += 1
    return reps


def pack(load_E: Tensor, replicas_E: Tensor, num_devices: int) -> Placement:
    """Longest-processing-time packing of replicas (load_e / r_e each) onto ``num_devices``
    devices holding equally many replicas; a device avoids a second copy of an expert."""
    G, E = num_devices, load_E.shape[0]
    total = int(replicas_E.sum())
    if total % G:
        raise ValueError(f"{total} replicas do not split evenly over {G} devices")
    per_device = total // G
    share_E = load_E.double() / replicas_E.double()
    items = [(float(share_E[e]), e) for e in range(E) for _ in range(int(replicas_E[e]))]
    items.sort(key=lambda it: (-it[0], it[1]))
    hosts = torch.zeros(G, E, dtype=torch.int64)
    dev_load, dev_n = [0.0] * G, [0] * G
    for share, e in items:
        free = [g for g in range(G) if dev_n[g] < per_device]
        fresh = [g for g in free if hosts[g, e] == 0] or free
        g = min(fresh, key=lambda d: (dev_load[d], d))
        hosts[g, e] += 1
        dev_load[g] += share
        dev_n[g] += 1
    return Placement(hosts)


def greedy_placement(load_E: Tensor, num_devices: int, *, redundant: int = 0) -> Placement:
    """EPLB-style placement from observed loads: ceil(E/G) + ``redundant`` replicas per
    device, replicas to the hottest experts, packed longest-processing-time first."""
    E, G = load_E.shape[0], num_devices
    per_device = max(1, math.ceil(E / G)) + redundant
    return pack(load_E, replicate(load_E, per_device * G), G)


# ----------------------------------------------------------------------------- simulator


@dataclass(frozen=True)
class EPResult:
    """One row of the simulation (means over layers; bytes summed over layers)."""

    ep: int
    rebalance: bool
    replicas_per_device: float
    maxvio_expert: float
    maxvio_device: float
    straggler: float
    a2a_bytes: float
    a2a_bytes_per_token: float
    device_load: list[float]  # (G,) mean over layers, in slots


def layer_stats(
    experts_TK: Tensor, num_experts: int, placement: Placement, *, d_model: int, bytes_per_elt: int
) -> dict[str, float | Tensor]:
    """Device load, MaxVio, straggler and all-to-all bytes of one layer's routing (T, K)."""
    G = placement.hosts_GE.shape[0]
    T = experts_TK.shape[0]
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts).double()
    load_G = placement.device_load(counts_E)
    local_GE = placement.hosts_GE.double() / placement.replicas_E.double()  # P(stay on g)
    src_T = torch.arange(T) * G // T
    off = (1 - local_GE[src_T.unsqueeze(1), experts_TK]).sum()
    return {
        "load_G": load_G,
        "maxvio_expert": float(counts_E.max() / counts_E.mean() - 1),
        "maxvio_device": float(load_G.max() / load_G.mean() - 1),
        "straggler": float(load_G.max() / load_G.mean()),
        "a2a_bytes": float(off) * d_model * bytes_per_elt * 2,
    }


def simulate_ep(
    trace: dict,
    ep_sizes: tuple[int, ...] = DEFAULT_EP_SIZES,
    *,
    rebalance: bool = False,
    redundant: int = 1,
    bytes_per_elt: int = 2,
    fit_fraction: float = 0.5,
) -> list[EPResult]:
    """Simulate expert parallelism over ``ep_sizes`` devices for a routing trace.

    trace: ``{"experts": [(T, K) int per layer], "num_experts": E, "d_model": D}`` (see
    ``save_traces``), or ``{"counts": (N, E), "num_experts": E, "d_model": D}`` for bare
    counts (then every slot is taken to leave its device with probability 1 - 1/G and the
    rebalanced placement is fitted on the same counts). Rebalanced: ``greedy_placement`` with
    ``redundant`` extra replicas per device, fitted on the first ``fit_fraction`` of tokens.
    """
    check_trace(trace)
    E, D = int(trace["num_experts"]), int(trace["d_model"])
    fit, test = _split(trace, fit_fraction)
    rows = []
    for G in ep_sizes:
        per_layer, loads = [], []
        for fit_TK, test_TK in zip(fit, test, strict=True):
            if rebalance:
                fit_E = torch.bincount(fit_TK.reshape(-1), minlength=E)
                placement = greedy_placement(fit_E, G, redundant=redundant)
            else:
                placement = contiguous_placement(E, G)
            s = layer_stats(test_TK, E, placement, d_model=D, bytes_per_elt=bytes_per_elt)
            per_layer.append(s)
            loads.append(s["load_G"])
        n = len(per_layer)
        tokens = test[0].shape[0]
        total_bytes = sum(s["a2a_bytes"] for s in per_layer)
        rows.append(
            EPResult(
                ep=G,
                rebalance=rebalance,
                replicas_per_device=float(placement.replicas_E.sum()) / G,
                maxvio_expert=sum(s["maxvio_expert"] for s in per_layer) / n,
                maxvio_device=sum(s["maxvio_device"] for s in per_layer) / n,
                straggler=sum(s["straggler"] for s in per_layer) / n,
                a2a_bytes=total_bytes,
                a2a_bytes_per_token=total_bytes / tokens,
                device_load=[round(float(x), 3) for x in torch.stack(loads).mean(0)],
            )
        )
    return rows


def _split(trace: dict, fit_fraction: float) -> tuple[list[Tensor], list[Tensor]]:
    """(fit, test) routing per layer. Bare counts become a synthetic trace whose tokens are
    spread over devices round-robin (every slot leaves its device with probability 1 - 1/G)."""
    if "experts" in trace:
        layers = [torch.as_tensor(t).long() for t in trace["experts"]]
        cut = max(1, min(layers[0].shape[0] - 1, int(layers[0].shape[0] * fit_fraction)))
        return [t[:cut] for t in layers], [t[cut:] for t in layers]
    counts_NE = torch.as_tensor(trace["counts"]).long()
    layers = []
    for c_E in counts_NE:
        ids = torch.repeat_interleave(torch.arange(c_E.shape[0]), c_E)
        layers.append(_interleave(ids).unsqueeze(1))
    return layers, layers


def _interleave(ids: Tensor) -> Tensor:
    """Spread a sorted id list so that any contiguous device shard sees the same mix."""
    order = torch.argsort(torch.rand(ids.shape[0], generator=torch.Generator().manual_seed(0)))
    return ids[order]


# ----------------------------------------------------------------------------- traces


def save_traces(source: str | Path, out_file: str | Path, *, tokens: int = 8192) -> dict:
    """Route ~``tokens`` validation tokens (every domain, equal shares, sequences shuffled) of
    a trained run folder or checkpoint and save ``{"format", "experts": [(T, K) int16 per
    layer], "num_experts", "top_k", "d_model", "source", "step"}`` with ``torch.save``."""
    from moelab.data import val_batches
    from moelab.inspect import load_trained

    run = load_trained(source)
    L = run.cfg.data.seq_len
    per_domain = max(1, tokens // (L * len(run.corpus.domains)))
    seqs = []
    for name in run.corpus.domains:
        got = []
        for b in val_batches(run.corpus, batch_size=16, seq_len=L, domains=[name]):
            got.extend(b.tokens)
            if len(got) >= per_domain:
                break
        seqs.extend(got[:per_domain])
    if not seqs:
        raise ValueError(f"no validation sequences of length {L} in {str(source)!r}")
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))
    tokens_BL = torch.stack([seqs[i] for i in order])
    layers: list[list[Tensor]] = []
    with torch.no_grad():
        for chunk in tokens_BL.split(16):
            outs = run.model(chunk).moe
            layers = layers or [[] for _ in outs]
            for acc, o in zip(layers, outs, strict=True):
                acc.append(o.experts.to(torch.int16))
    if not layers:
        raise ValueError(f"{str(source)!r} has no MoE layers to trace")
    moe = run.cfg.model.moe
    trace = {
        "format": TRACE_FORMAT,
        "experts": [torch.cat(acc) for acc in layers],
        "num_experts": moe.num_experts,
        "top_k": moe.top_k,
        "d_model": run.cfg.model.d_model,
        "source": str(source),
        "step": run.step,
    }
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    torch.save(trace, out_file)
    return trace


def load_traces(path: str | Path) -> dict:
    """A trace saved by ``save_traces``, checked by :func:`check_trace` (a file that is not
    one, or a malformed one, is a one-line ``ValueError`` naming the file)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"trace file {str(path)!r} does not exist; make one with --from-run"
        )
    try:
        trace = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise ValueError(
            f"{str(path)!r} is not a moelab routing trace ({TRACE_FORMAT}): cannot read it as "
            f"a torch file of tensors ({type(exc).__name__}; truncated or another program's?)"
        ) from exc
    if not isinstance(trace, dict) or trace.get("format") != TRACE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a moelab routing trace ({TRACE_FORMAT})")
    check_trace(trace, str(path))
    return trace


def _positive_int(trace: dict, key: str, where: str) -> int:
    value = trace.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"trace {where!r}: {key}={value!r} is not allowed; expected an integer >= 1"
        )
    return value


def _int_tensor(value: object, what: str, where: str, ndim: int) -> Tensor:
    """``value`` (a tensor or nested lists) as an integer tensor of ``ndim`` dimensions, else
    a ValueError naming it."""
    if isinstance(value, (list, tuple)):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            pass  # refused below as a list
    bad = not isinstance(value, Tensor) or value.dtype.is_floating_point or value.is_complex()
    if bad or value.dtype == torch.bool or value.dim() != ndim:
        kind = f"{type(value).__name__}" + (
            f" {value.dtype} of shape {tuple(value.shape)}" if isinstance(value, Tensor) else ""
        )
        raise ValueError(f"trace {where!r}: {what} is a {kind}; expected a {ndim}-D integer tensor")
    return value


def check_trace(trace: dict, where: str = "trace") -> None:
    """Refuse a malformed trace with one ``ValueError`` naming ``where`` and what is wrong:
    ``num_experts`` / ``d_model`` integers >= 1, and either ``experts`` (a non-empty list of
    (T, K) integer tensors, one T >= 2 for every layer, ids in [0, E)) or ``counts`` ((N, E)
    non-negative integers, every row summing to more than 0)."""
    E = _positive_int(trace, "num_experts", where)
    _positive_int(trace, "d_model", where)
    if ("experts" in trace) == ("counts" in trace):
        raise ValueError(f"trace {where!r}: expected exactly one of 'experts' and 'counts'")
    if "counts" in trace:
        counts_NE = _int_tensor(trace["counts"], "counts", where, 2)
        if counts_NE.shape[0] < 1 or counts_NE.shape[1] != E:
            raise ValueError(
                f"trace {where!r}: counts has shape {tuple(counts_NE.shape)}; expected "
                f"(layers >= 1, num_experts={E})"
            )
        if (counts_NE < 0).any() or (counts_NE.sum(1) == 0).any():
            raise ValueError(
                f"trace {where!r}: counts must be >= 0 with every layer's row summing to > 0"
            )
        return
    layers = trace["experts"]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"trace {where!r}: experts must be a non-empty list of (T, K) tensors")
    tokens = set()
    for i, value in enumerate(layers):
        t = _int_tensor(value, f"experts[{i}]", where, 2)
        tokens.add(t.shape[0])
        if t.shape[0] < 2 or t.shape[1] < 1:
            raise ValueError(
                f"trace {where!r}: experts[{i}] has shape {tuple(t.shape)}; expected "
                "(T >= 2, K >= 1)"
            )
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= E):
            raise ValueError(
                f"trace {where!r}: experts[{i}] holds expert ids in [{int(t.min())}, "
                f"{int(t.max())}]; allowed: [0, num_experts={E})"
            )
    if len(tokens) > 1:
        raise ValueError(
            f"trace {where!r}: the layers route different numbers of tokens {sorted(tokens)}; "
            "expected the same T in every layer"
        )


# ----------------------------------------------------------------------------- report + CLI


def write_report(rows: list[EPResult], out: str | Path, trace: dict) -> None:
    """simulate_ep.json, simulate_ep.md (table) and simulate_ep.png (plot) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: trace.get(k) for k in ("num_experts", "top_k", "d_model", "source", "step")}
    (out / "simulate_ep.json").write_text(
        json.dumps({"trace": meta, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    head = (
        "| EP | placement | replicas/device | MaxVio expert | MaxVio device | straggler "
        "| all-to-all MB | bytes/token |\n|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r.ep} | {'rebalanced' if r.rebalance else 'contiguous'} | "
        f"{r.replicas_per_device:g} | {r.maxvio_expert:.3f} | {r.maxvio_device:.3f} | "
        f"{r.straggler:.3f} | {r.a2a_bytes / 1e6:.3f} | {r.a2a_bytes_per_token:.0f} |\n"
        for r in sorted(rows, key=lambda r: (r.ep, r.rebalance))
    )
    (out / "simulate_ep.md").write_text(
        f"# simulate-ep: {meta['source']}\n\nE={meta['num_experts']}, K={meta['top_k']}, "
        f"d_model={meta['d_model']}; held-out tokens, means over layers.\n\n{head}{body}"
    )
    _plot(rows, out / "simulate_ep.png")


def _plot(rows: list[EPResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for rebalance, style in ((False, "o-"), (True, "s--")):
        rs = sorted((r for r in rows if r.rebalance == rebalance), key=lambda r: r.ep)
        label = "rebalanced (EPLB-style)" if rebalance else "contiguous"
        a.plot([r.ep for r in rs], [r.straggler for r in rs], style, label=label)
        b.plot([r.ep for r in rs], [r.a2a_bytes_per_token for r in rs], style, label=label)
    for ax, title in ((a, "straggler factor (max / mean device load)"), (b, "all-to-all bytes")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("EP size (devices)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    b.set_ylabel("bytes per token (all layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SIMULATE_EP_FILES = ("simulate_ep.json", "simulate_ep.md", "simulate_ep.png")


def check_options(
    trace: str,
    out: str,
    *,
    ep_sizes: str,
    redundant: int,
    tokens: int,
    bytes_per_elt: int,
    from_run: str | None,
) -> tuple[int, ...]:
    """The EP sizes of ``ep_sizes`` ("1,2,4"); every option and ``out`` checked before work."""
    from moelab.runfolder import check_output_folder

    try:
        sizes = tuple(int(s) for s in ep_sizes.split(","))
    except ValueError:
        raise ValueError(f"--ep-sizes={ep_sizes!r}: give integers like 1,2,4") from None
    if not sizes or min(sizes) < 1 or redundant < 0 or tokens < 1:
        raise ValueError("--ep-sizes must be >= 1, --redundant >= 0 and --tokens >= 1")
    if bytes_per_elt < 1:
        raise ValueError(f"--bytes-per-elt {bytes_per_elt} is out of range; allowed: >= 1")
    if from_run and Path(trace).exists():  # re-tracing replaces only a trace
        load_traces(trace)
    if not from_run and not Path(trace).is_file():
        load_traces(trace)  # the missing input is named before the output is checked
    check_output_folder(out, "simulate-ep", SIMULATE_EP_FILES, keep=(trace,))
    return sizes


def simulate_to_folder(
    trace: str,
    out: str,
    sizes: tuple[int, ...],
    *,
    redundant: int = 1,
    bytes_per_elt: int = 2,
    from_run: str | None = None,
    tokens: int = 8192,
) -> Path:
    """``moelab simulate-ep``: contiguous and rebalanced placement at every EP size in ``sizes``
    (tracing ``from_run`` into ``trace`` first when given) -> ``out/simulate_ep.{md,json,png}``;
    returns the Markdown file."""
    routing = save_traces(from_run, trace, tokens=tokens) if from_run else load_traces(trace)
    rows = simulate_ep(routing, sizes, rebalance=False, bytes_per_elt=bytes_per_elt)
    rows += simulate_ep(
        routing, sizes, rebalance=True, redundant=redundant, bytes_per_elt=bytes_per_elt
    )
    write_report(rows, out, routing)
    return Path(out) / "simulate_ep.md"
