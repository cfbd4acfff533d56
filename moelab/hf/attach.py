"""``moelab.hf.attach``: moelab's load balancing on a transformers MoE model, for training.

The loss-free bias (Wang et al. 2024 Alg. 1) changes *which* experts are chosen, never the gate
weights of the chosen ones, and goes where the family allows:

- a family with its own selection-bias slot (``e_score_correction_bias``, ``expert_bias``, ...;
  the registry's ``bias`` field) gets moelab's bias *written into that slot* before every
  router call (slot = its value at attach + the bias), so the model's own forward routes with
  it and ``save_pretrained`` carries it: plain transformers loads the balanced routing;
- any other router's forward is wrapped (on the instance; ``detach`` restores it): its own
  forward runs, then :func:`moelab.hf.outputs.select` re-selects with the family's rule plus the
  bias and the output's weights / experts are replaced (bit-identical at zero bias).

Routers whose selection is fixed (DeepSeek-V4's hash layers) are left alone; a router with no
rule and no slot is refused with one line naming it. Every router gets a
:class:`moelab.balancer.Balancer`, the same balancing state and policy as a moelab MoE layer:
the same forward feeds it the routing, and it computes the balance terms switched on (the
Switch loss at micro or global scope, counts accumulated over the micro-batches of an optimizer
step, Qiu et al. 2025; DeepSeek-V3's sequence-wise loss; z-loss; the entropy losses).
``handle.aux_loss()`` sums them for the last forward (each averaged over layers, coefficient
applied); ``handle.end_step()`` runs every balancer's step update (bias, adaptive λ per layer)
and resets the counts. The state (biases, counts, step, coefficients, config) is saved beside
the model as ``moelab_balance.pt``.

Shape legend: T tokens, E experts, K top-k, B sequences, L sequence length, N MoE layers.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab import metrics
from moelab.balancer import TERMS, BalanceInputs, Balancer
from moelab.config import BalanceConfig, from_dict, to_dict
from moelab.hf import outputs as ho
from moelab.hf import routers as hr
from moelab.hf.routers import RouterSite, find_routers
from moelab.hf.status import balancing_status, summary
from moelab.routing import Routing, score_fn

STATE_FILE = "moelab_balance.pt"
FORMAT = "moelab.hf.attach/1"
# What a transformers router gives the balance terms: no expert placement, capacity, learned
# noise, moelab gate weights or a moelab router weight.
UNAVAILABLE = {"placement", "capacity", "noise", "gates", "router"}
UNSUPPORTED = tuple(t.coef for t in TERMS if UNAVAILABLE & set(t.needs))


@dataclass(frozen=True)
class StepStats:
    """What ``end_step`` saw: MaxVio of the step's counts (mean and per layer), rates used."""

    maxvio: float
    maxvio_layers: list[float]
    bias_rate: float
    aux_coef: float  # mean over layers of the live coefficient (adaptive λ is per layer)
    aux_coef_layers: list[float] | None = None


def disable_model_aux(model: nn.Module) -> dict[str, Any]:
    """Turn off the model's own router aux loss; returns the old values for restoring."""
    config = model.config
    old = {
        "output_router_logits": getattr(config, "output_router_logits", None),
        "router_aux_loss_coef": getattr(model, "router_aux_loss_coef", None),
    }
    if old["output_router_logits"] is not None:
        config.output_router_logits = False
    if old["router_aux_loss_coef"] is not None:  # cached on the model in __init__
        model.router_aux_loss_coef = 0.0
    return old


def site_mode(site: RouterSite) -> str:
    """How attach balances a router: ``slot`` (the family's own bias slot), ``wrap`` (its
    forward re-selects with the rule), ``static`` (fixed selection, left alone) or ``refuse``."""
    if site.family is not None and site.family.static:
        return "static"
    if site.bias_slot() is not None:
        return "slot"
    return "refuse" if hr.unsupported_reason(site) else "wrap"


def _check_config(cfg: BalanceConfig, sites: list[RouterSite]) -> None:
    used = [name for name in UNSUPPORTED if getattr(cfg, name) > 0]
    if used:
        allowed = ", ".join(t.coef for t in TERMS if t.coef not in UNSUPPORTED)
        raise ValueError(
            f"moelab.hf.attach does not support balance.{used[0]} (needs expert placement, "
            f"capacity, learned noise, gate weights or the router weight); allowed: {allowed}, "
            "bias_rate"
        )
    for site in sites:
        if site_mode(site) == "refuse":
            raise ValueError(
                f"moelab.hf.attach: router class {type(site.module).__name__} ({site.name}): "
                f"{hr.unsupported_reason(site)}; profile works, attach does not"
            )
    if cfg.z_coef > 0 and any(s.probs_recorded for s in sites):
        raise ValueError(
            "balance.z_coef: this family records router probabilities, not logits; allowed: 0"
        )
    if cfg.seq_aux_coef > 0 and any(s.num_null for s in sites):
        raise ValueError("balance.seq_aux_coef: not with null experts (LongCat, Zaya); allowed: 0")


class BalanceHandle:
    """The balance state attached to a model; see the module docstring.

    balancers: one :class:`Balancer` per router site. bias / step_counts: their N (E,) tensors
    (selection-only bias; slots counted in training-mode forwards since the last
    ``end_step``); steps: optimizer steps so far.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: BalanceConfig,
        *,
        total_steps: int | None = None,
        disable_own_aux: bool = True,
    ) -> None:
        self.model, self.total_steps = model, total_steps
        self.sites = [s for s in find_routers(model) if site_mode(s) != "static"]
        if not self.sites:
            raise ValueError("moelab.hf.attach: every router of this model has a fixed selection")
        _check_config(cfg, self.sites)
        self.status = balancing_status(model, self.sites)  # as configured, before attach
        self._use_config(cfg)
        self._last: dict[str, dict[int, Tensor]] = {}
        self._seq_shape: tuple[int, int] | None = None
        self._old_aux = disable_model_aux(model) if disable_own_aux else None
        self.modes = [site_mode(s) for s in self.sites]
        self._slot0 = [
            s.bias_slot().detach().clone() if m == "slot" else None
            for s, m in zip(self.sites, self.modes, strict=True)
        ]
        self._hooks = [model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)]
        for i, (site, mode) in enumerate(zip(self.sites, self.modes, strict=True)):
            if mode == "slot":
                self._hooks.append(site.module.register_forward_pre_hook(self._make_write(i)))
                self._hooks.append(site.module.register_forward_hook(self._make_record(i)))
            else:
                site.module.forward = self._make_forward(i)
        self.attached = True

    def _use_config(self, cfg: BalanceConfig) -> None:
        """A fresh balancer per router for ``cfg``."""
        dev = next(iter(self.sites[0].module.state_dict().values())).device
        self.cfg = cfg
        self.balancers = [
            Balancer(cfg, num_experts=s.num_experts, top_k=s.top_k, score=s.score).to(dev)
            for s in self.sites
        ]

    @property
    def bias(self) -> list[Tensor]:
        return [b.bias for b in self.balancers]

    @property
    def step_counts(self) -> list[Tensor]:
        return [b.step_counts for b in self.balancers]

    @property
    def steps(self) -> int:
        return int(self.balancers[0].progress)

    @property
    def aux_coef(self) -> float:
        """Mean over layers of the live aux coefficient."""
        return sum(float(b.aux_coef) for b in self.balancers) / len(self.balancers)

    # ------------------------------------------------------------------ forward path

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Start of a model forward: forget the last losses, note (B, L) for sequence scope;
        refuse a training forward whose balance losses reentrant checkpointing would lose."""
        self._last = {}
        if module.training and torch.is_grad_enabled() and any(b.terms for b in self.balancers):
            check_checkpointing(module)
        x = kwargs.get("input_ids", args[0] if args else None)
        x = kwargs.get("inputs_embeds") if x is None else x
        self._seq_shape = tuple(x.shape[:2]) if x is not None and x.dim() >= 2 else None

    def _make_write(self, i: int):
        """Pre-hook of a slot router: slot = its value at attach + moelab's bias (E,)."""

        def write(module: nn.Module, args: tuple) -> None:
            with torch.no_grad():
                ho.write_slot(self.sites[i], self._slot0[i], self.balancers[i].bias)

        return write

    def _make_record(self, i: int):
        """Forward hook of a slot router: the model's own choice feeds the balancer."""
        site = self.sites[i]

        def record(module: nn.Module, args: tuple, output: object) -> None:
            logits_TC = ho.recorded_scores(site, output)
            experts_TK = ho.experts_of(site, output, logits_TC)
            self._observe(i, logits_TC, ho.weights_of(site, output), experts_TK, module.training)

        return record

    def _make_forward(self, i: int):
        """The wrapped forward of a rule router: its own forward, then moelab's re-selection
        with the bias (the balancer is looked up per call: load_state_dict renews it)."""
        site = self.sites[i]
        own = type(site.module).forward.__get__(site.module)

        def forward(*args, **kwargs):
            output = own(*args, **kwargs)
            logits_TC = ho.recorded_scores(site, output)
            weights_TK, experts_TK = ho.select(site, logits_TC, self.balancers[i].bias)
            self._observe(i, logits_TC, weights_TK, experts_TK, site.module.training)
            return ho.replace_choice(site, output, weights_TK, experts_TK)

        return forward

    def _observe(
        self,
        i: int,
        logits_TC: Tensor,
        weights_TK: Tensor | None,
        experts_TK: Tensor,
        training: bool,
    ) -> None:
        """Counts over the E real experts (null slots left out) and, with gradients on, the
        balance terms of this call."""
        site = self.sites[i]
        E = site.num_experts
        ids_S = experts_TK.flatten()
        real_S = ids_S < E
        counts_E = torch.zeros(E, dtype=torch.long, device=ids_S.device)
        counts_E.scatter_add_(0, ids_S.clamp(max=E - 1), real_S.long())  # no host sync on GPU
        if torch.is_grad_enabled():
            if site.probs_recorded:
                scores_TE, logits_TE = logits_TC[:, :E].float(), logits_TC[:, :E].float().log()
            else:
                scores_TE = score_fn(logits_TC.float(), site.score)[:, :E]
                logits_TE = logits_TC[:, :E]
            weights_TK = (
                scores_TE.gather(1, experts_TK.clamp(max=E - 1))
                if weights_TK is None
                else weights_TK
            )
            routing = Routing(logits_TE, scores_TE, weights_TK, experts_TK.clamp(max=E - 1))
            self._record_losses(i, routing, counts_E, training)
        if training:
            self._count(i, ho.scores_of(site, logits_TC), counts_E)

    def _count(self, i: int, scores_TE: Tensor, counts_E: Tensor) -> None:
        """Training forward: counts (and, under Quantile Balancing, the price estimate from the
        model's plain scores, without its own correction bias or groups) into the step."""
        b = self.balancers[i]
        prices_E = b.price_estimate(scores_TE.detach()) if b.quantile else None
        b.count(counts_E, prices_E)

    def _seq_len(self, num_tokens: int) -> int | None:
        """L when the router saw the model input's B·L tokens, else None (a model that drops
        or pads tokens: the sequence-wise loss is left out)."""
        if self._seq_shape is None or self._seq_shape[0] * self._seq_shape[1] != num_tokens:
            return None
        return self._seq_shape[1]

    def _record_losses(self, i: int, routing: Routing, counts_E: Tensor, training: bool) -> None:
        T = routing.experts.shape[0]
        inputs = BalanceInputs(routing, counts_E, counts_E, training, seq_len=self._seq_len(T))
        for name, value in self.balancers[i].losses(inputs).items():
            self._last.setdefault(name, {})[i] = value

    # ------------------------------------------------------------------ public API

    def losses(self) -> dict[str, Tensor]:
        """Each balance loss of the last forward, averaged over layers, coefficient applied."""
        return {n: torch.stack(list(v.values())).mean() for n, v in self._last.items() if v}

    def aux_loss(self) -> Tensor:
        """Sum of :meth:`losses` (0-dim; 0 when every coefficient is off). Add it to the LM loss."""
        parts = list(self.losses().values())
        if not parts:
            return torch.zeros((), device=self.bias[0].device)
        return torch.stack(parts).sum()

    @torch.no_grad()
    def end_step(self) -> StepStats:
        """After each optimizer step: every balancer's update (loss-free bias from the step's
        counts, Wang et al. 2024 Alg. 1; adaptive aux coefficient per layer), then the counts
        reset. A step with no training-mode forward changes nothing but the step counter."""
        maxvios = metrics.max_violation(torch.stack(self.step_counts)).tolist()  # one host sync
        rate = self.balancers[0].rate_at(self.total_steps)
        for b in self.balancers:
            b.end_step(self.total_steps)
        coefs = [float(b.aux_coef) for b in self.balancers]
        return StepStats(sum(maxvios) / len(maxvios), maxvios, rate, self.aux_coef, coefs)

    def freeze_routers(self, frozen: bool = True) -> None:
        """requires_grad False (or back to True) on every router parameter."""
        for site in self.sites:
            for p in site.module.parameters():
                p.requires_grad_(not frozen)

    def state_dict(self) -> dict[str, Any]:
        """Plain state (tensors on CPU, config as a dict) for ``torch.save``."""
        return {
            "format": FORMAT,
            "balance": to_dict(self.cfg),
            "sites": [s.name for s in self.sites],
            "bias": [b.detach().cpu() for b in self.bias],
            "step_counts": [c.cpu() for c in self.step_counts],
            "steps": self.steps,
            "aux_coef": self.aux_coef,
            "aux_coef_layers": [float(b.aux_coef) for b in self.balancers],
            "total_steps": self.total_steps,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], *, keep_config: bool = False) -> None:
        """Restore biases, counts and step; the saved config and coefficients too unless
        ``keep_config``."""
        names = [s.name for s in self.sites]
        if state.get("format") != FORMAT or state["sites"] != names:
            raise ValueError(
                "saved moelab balance state does not match this model: routers "
                f"{state.get('sites')} vs {names}"
            )
        if not keep_config:
            self._use_config(from_dict(BalanceConfig, state["balance"]))
            self.total_steps = state["total_steps"]
            coefs = state.get("aux_coef_layers") or [state["aux_coef"]] * len(names)
            for b, c in zip(self.balancers, coefs, strict=True):
                b.aux_coef.fill_(float(c))
        for b, bias, counts in zip(
            self.balancers, state["bias"], state["step_counts"], strict=True
        ):
            b.bias.copy_(bias)
            b.step_counts.copy_(counts)
            b.progress.fill_(int(state["steps"]))

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/moelab_balance.pt`` atomically (tmp file + os.replace)."""
        path = Path(folder) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def describe(self) -> list[str]:
        """What was active before attach (HF's aux loss, frozen biases, warnings) and what
        moelab does now, as short lines."""
        slots = sum(m == "slot" for m in self.modes)
        own = "off" if self._old_aux is not None else "left as configured"
        return [
            *(f"before attach: {line}" for line in summary(self.status)),
            f"moelab: {len(self.sites)} routers; loss-free bias in the family's own slot on "
            f"{slots}, by re-selection on {len(self.sites) - slots}; HF aux loss {own}; "
            f"terms {[t.name for t in self.balancers[0].terms]}",
        ]

    @torch.no_grad()
    def rebase_slots(self) -> None:
        """Take the bias slots as already holding the balancers' biases (a model saved with
        them): their value at attach becomes slot − bias."""
        for i, slot0 in enumerate(self._slot0):
            if slot0 is not None:
                E = self.sites[i].num_experts
                slot_C = self.sites[i].bias_slot().view(-1)
                slot0.view(-1)[:E].copy_(slot_C[:E] - self.bias[i].to(slot_C))

    def detach(self) -> None:
        """Restore the routers' own forward and the model's aux-loss settings. A bias written
        into a family's own slot stays there, so ``save_pretrained`` carries it."""
        if not self.attached:
            return
        for site, mode in zip(self.sites, self.modes, strict=True):
            if mode == "wrap":
                del site.module.forward  # the instance attribute; the class method comes back
        for hook in self._hooks:
            hook.remove()
        if self._old_aux is not None:
            if self._old_aux["output_router_logits"] is not None:
                self.model.config.output_router_logits = self._old_aux["output_router_logits"]
            if self._old_aux["router_aux_loss_coef"] is not None:
                self.model.router_aux_loss_coef = self._old_aux["router_aux_loss_coef"]
        self.attached = False


def check_checkpointing(model: nn.Module) -> None:
    """Refuse transformers' gradient checkpointing with ``use_reentrant=True``: its first
    forward of each layer runs without autograd, so a balance loss taken from the router's
    output carries no gradient (moelab's aux loss would be a silent 0) and only the backward's
    recompute sees one, too late. Non-reentrant checkpointing (transformers' default since
    v5) records the losses in the forward and counts once (the recompute counts nothing)."""
    for m in model.modules():
        fn = getattr(m, "_gradient_checkpointing_func", None)
        on = getattr(m, "gradient_checkpointing", False)
        if on and isinstance(fn, functools.partial) and fn.keywords.get("use_reentrant", True):
            raise ValueError(
                f"{type(model).__name__} uses gradient checkpointing with use_reentrant=True, "
                "under which moelab's balance losses get no gradient; enable it with "
                "gradient_checkpointing_kwargs={'use_reentrant': False} "
                "(TrainingArguments.gradient_checkpointing_kwargs)"
            )


def attach(
    model: nn.Module,
    balance: BalanceConfig | None = None,
    from_folder: str | Path | None = None,
    *,
    total_steps: int | None = None,
    disable_own_aux: bool = True,
) -> BalanceHandle:
    """Put moelab's balancing on a transformers MoE model; returns the :class:`BalanceHandle`.

    balance: the config (default: the one saved in ``from_folder``, else ``BalanceConfig()``).
    from_folder: a folder holding ``moelab_balance.pt`` (written by ``handle.save``) whose
    biases, counts and step are restored; ignored when the file is absent.
    total_steps: needed by the ``linear``/``cosine`` bias schedules.
    disable_own_aux: turn off the model's built-in router aux loss (restored by ``detach``).
    """
    path = None if from_folder is None else Path(from_folder) / STATE_FILE
    state = torch.load(path, weights_only=True) if path is not None and path.is_file() else None
    cfg = balance or (from_dict(BalanceConfig, state["balance"]) if state else BalanceConfig())
    if cfg.bias_schedule != "constant" and total_steps is None and not state:
        raise ValueError(f"balance.bias_schedule={cfg.bias_schedule!r} needs total_steps")
    handle = BalanceHandle(model, cfg, total_steps=total_steps, disable_own_aux=disable_own_aux)
    if state is not None:
        handle.load_state_dict(state, keep_config=balance is not None)
        handle.rebase_slots()  # the saved model's slots hold the saved biases already
        if total_steps is not None:
            handle.total_steps = total_steps
    return handle
