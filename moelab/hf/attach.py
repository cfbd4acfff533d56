"""``moelab.hf.attach``: moelab's load balancing on a transformers MoE model, for training.

Each router's forward is replaced (on the instance; ``detach`` restores it) by
:func:`moelab.hf.routers.select`, which reproduces the model's own rule with a selection-only
bias per layer (loss-free balancing, Wang et al. 2024 Alg. 1): the bias changes *which* experts
are chosen, never the gate weights of the chosen ones. The same forward records what the
balance losses need (``moelab.balance``): the Switch loss at micro, sequence or global scope
(counts accumulated over the micro-batches of an optimizer step, Qiu et al. 2025), DeepSeek-V3's
sequence-wise loss, z-loss, and the entropy losses. ``handle.aux_loss()`` sums them for the last
forward (each averaged over layers, times its coefficient); ``handle.end_step()`` updates the
biases from the accumulated counts and resets them. The state (biases, counts, step, config)
is saved beside the model as ``moelab_balance.pt``.

Shape legend: T tokens, E experts, K top-k, B sequences, L sequence length, N MoE layers.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab import balance, metrics
from moelab.config import BalanceConfig, from_dict, to_dict
from moelab.hf.routers import RouterSite, find_routers, router_logits, scores_from_logits, select

STATE_FILE = "moelab_balance.pt"
FORMAT = "moelab.hf.attach/1"
UNSUPPORTED = ("device_coef", "comm_coef", "importance_coef", "load_coef", "overflow_coef")


@dataclass(frozen=True)
class StepStats:
    """What ``end_step`` saw: MaxVio of the step's counts (mean and per layer), rates used."""

    maxvio: float
    maxvio_layers: list[float]
    bias_rate: float
    aux_coef: float


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


def _check_config(cfg: BalanceConfig, sites: list[RouterSite]) -> None:
    used = [name for name in UNSUPPORTED if getattr(cfg, name) > 0]
    if used:
        raise ValueError(
            f"moelab.hf.attach does not support balance.{used[0]} (needs expert placement or "
            "capacity); allowed: aux_coef, seq_aux_coef, z_coef, entropy_coef, "
            "batch_entropy_coef, bias_rate"
        )
    unknown = [s for s in sites if s.rule is None]
    if unknown:
        raise ValueError(
            f"moelab.hf.attach: router class {type(unknown[0].module).__name__} "
            f"({unknown[0].name}) has no known selection rule; profile works, attach does not"
        )


class BalanceHandle:
    """The balance state attached to a model; see the module docstring.

    bias: N tensors (E,) (selection-only bias); step_counts: N tensors (E,) of slots counted
    in training-mode forwards since the last ``end_step``; steps: optimizer steps so far.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: BalanceConfig,
        *,
        total_steps: int | None = None,
        disable_own_aux: bool = True,
    ) -> None:
        self.model, self.cfg, self.total_steps = model, cfg, total_steps
        self.sites = find_routers(model)
        _check_config(cfg, self.sites)
        dev = self.sites[0].module.weight.device
        self.bias = [torch.zeros(s.num_experts, device=dev) for s in self.sites]
        self.step_counts = [
            torch.zeros(s.num_experts, dtype=torch.long, device=dev) for s in self.sites
        ]
        self.steps = 0
        self.aux_coef = cfg.aux_coef
        self._last: dict[str, dict[int, Tensor]] = {}
        self._seq_shape: tuple[int, int] | None = None
        self._old_aux = disable_model_aux(model) if disable_own_aux else None
        for i, site in enumerate(self.sites):
            site.module.forward = types.MethodType(self._make_forward(i), site.module)
        self._pre_hook = model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)
        self.attached = True

    # ------------------------------------------------------------------ forward path

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Start of a model forward: forget the last losses, note (B, L) for sequence scope."""
        self._last = {}
        x = kwargs.get("input_ids", args[0] if args else None)
        x = kwargs.get("inputs_embeds") if x is None else x
        self._seq_shape = tuple(x.shape[:2]) if x is not None and x.dim() >= 2 else None

    def _make_forward(self, i: int):
        site = self.sites[i]

        def forward(module: nn.Module, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            logits_TE = router_logits(site, hidden_states)
            weights_TK, experts_TK = select(site, logits_TE, self.bias[i])
            ids_S = experts_TK.flatten()
            counts_E = torch.zeros(site.num_experts, dtype=torch.long, device=ids_S.device)
            counts_E.scatter_add_(0, ids_S, torch.ones_like(ids_S))  # no host sync on GPU
            if module.training:
                self.step_counts[i] += counts_E
            if torch.is_grad_enabled():
                self._record_losses(i, logits_TE, experts_TK, counts_E, module.training)
            return logits_TE, weights_TK, experts_TK

        return forward

    def _seq_view(self, x_TX: Tensor) -> Tensor | None:
        """(T, X) -> (B, L, X) when the model input shape is known and matches, else None."""
        if self._seq_shape is None or self._seq_shape[0] * self._seq_shape[1] != x_TX.shape[0]:
            return None
        return x_TX.view(*self._seq_shape, x_TX.shape[-1])

    def _record_losses(
        self, i: int, logits_TE: Tensor, experts_TK: Tensor, counts_E: Tensor, training: bool
    ) -> None:
        cfg, site = self.cfg, self.sites[i]
        scores_TE = scores_from_logits(logits_TE, site.score)
        losses: dict[str, Tensor] = {}
        if self.aux_coef > 0 or cfg.seq_aux_coef > 0:
            p_TE = balance.score_distribution(scores_TE, site.score)
            losses.update(self._switch_losses(i, p_TE, experts_TK, counts_E, training))
        if cfg.z_coef > 0:
            losses["z"] = cfg.z_coef * balance.z_loss(logits_TE)
        if cfg.entropy_coef > 0:
            losses["entropy"] = cfg.entropy_coef * balance.token_entropy_loss(scores_TE)
        if cfg.batch_entropy_coef > 0:
            losses["batch_entropy"] = cfg.batch_entropy_coef * balance.batch_entropy_loss(scores_TE)
        for name, value in losses.items():
            self._last.setdefault(name, {})[i] = value

    def _switch_losses(
        self, i: int, p_TE: Tensor, experts_TK: Tensor, counts_E: Tensor, training: bool
    ) -> dict[str, Tensor]:
        """Switch loss at the configured scope and DeepSeek-V3's sequence-wise loss.

        Sequence scope needs the (B, L) of the model input; when the router saw another token
        count (a model that drops or pads tokens) it falls back to the micro-batch counts.
        """
        cfg, E = self.cfg, self.sites[i].num_experts
        out: dict[str, Tensor] = {}
        seq = None
        if cfg.seq_aux_coef > 0 or (self.aux_coef > 0 and cfg.aux_scope == "sequence"):
            p_BLE, experts_BLK = self._seq_view(p_TE), self._seq_view(experts_TK)
            if p_BLE is not None:
                seq = balance.sequence_switch_loss(p_BLE, experts_BLK, E)
        if self.aux_coef > 0:
            if cfg.aux_scope == "sequence" and seq is not None:
                out["aux"] = self.aux_coef * seq
            else:  # global: counts of every micro-batch of this optimizer step so far
                glob = cfg.aux_scope == "global" and training
                scope_E = self.step_counts[i] if glob else counts_E
                out["aux"] = self.aux_coef * balance.switch_loss_from_stats(
                    counts=scope_E, probs=p_TE.mean(0)
                )
        if cfg.seq_aux_coef > 0 and seq is not None:
            out["seq_aux"] = cfg.seq_aux_coef * seq
        return out

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
        """After each optimizer step: loss-free bias update from the step's counts (Wang et al.
        2024 Alg. 1), adaptive aux coefficient, then reset the counts. A step with no
        training-mode forward (counts all zero) changes nothing but the step counter."""
        cfg = self.cfg
        rate = balance.bias_rate_at(
            self.steps, self.total_steps or 1, cfg.bias_rate, cfg.bias_schedule
        )
        counts_NE = torch.stack(self.step_counts)
        maxvios = metrics.max_violation(counts_NE).tolist()  # one host sync per step
        seen = (counts_NE.sum(-1) > 0).tolist()
        for i, counts_E in enumerate(self.step_counts):
            if rate > 0 and seen[i]:
                self.bias[i] = balance.update_bias(
                    self.bias[i], counts_E, rate, cfg.bias_rule, center=cfg.bias_center
                )
            counts_E.zero_()
        mean_maxvio = sum(maxvios) / len(maxvios)
        if cfg.adaptive_target > 0 and any(seen):
            self.aux_coef = balance.adapt_coef(
                self.aux_coef,
                mean_maxvio,
                target=cfg.adaptive_target,
                rate=cfg.adaptive_rate,
                lo=cfg.adaptive_min,
                hi=cfg.adaptive_max,
            )
        self.steps += 1
        return StepStats(mean_maxvio, maxvios, rate, self.aux_coef)

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
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any], *, keep_config: bool = False) -> None:
        """Restore biases, counts and step; the saved config too unless ``keep_config``."""
        names = [s.name for s in self.sites]
        if state.get("format") != FORMAT or state["sites"] != names:
            raise ValueError(
                "saved moelab balance state does not match this model: routers "
                f"{state.get('sites')} vs {names}"
            )
        dev = self.bias[0].device
        self.bias = [b.to(dev) for b in state["bias"]]
        self.step_counts = [c.to(dev) for c in state["step_counts"]]
        self.steps = int(state["steps"])
        if not keep_config:
            self.cfg = from_dict(BalanceConfig, state["balance"])
            self.aux_coef = float(state["aux_coef"])
            self.total_steps = state["total_steps"]

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/moelab_balance.pt`` atomically (tmp file + os.replace)."""
        path = Path(folder) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def detach(self) -> None:
        """Restore the routers' own forward and the model's aux-loss settings."""
        if not self.attached:
            return
        for site in self.sites:
            del site.module.forward  # the instance attribute; the class method comes back
        self._pre_hook.remove()
        if self._old_aux is not None:
            if self._old_aux["output_router_logits"] is not None:
                self.model.config.output_router_logits = self._old_aux["output_router_logits"]
            if self._old_aux["router_aux_loss_coef"] is not None:
                self.model.router_aux_loss_coef = self._old_aux["router_aux_loss_coef"]
        self.attached = False


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
        if total_steps is not None:
            handle.total_steps = total_steps
    return handle
