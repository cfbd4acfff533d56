"""``MoEBalanceCallback``: moelab balancing and routing health in a ``transformers.Trainer``.

``trainer.add_callback(moelab.hf.MoEBalanceCallback(BalanceConfig(...)))`` (TRL's trainers take
it too). At ``on_train_begin`` it :func:`moelab.hf.attach`-es the balance config to the model
(the model's own aux loss off, loss-free bias into the family's slot or by re-selection) and
adds the balance terms of every training forward to the model output's ``loss`` (a forward
hook on the model, so the Trainer's own loss, accumulation and scaling apply). After every
optimizer step (``on_step_end``) it runs the balancers' update and keeps the step's routing
health; ``on_log`` adds it to the logs: ``moe/maxvio`` (mean over layers), ``moe/maxvio/L``
per layer, ``moe/dead_experts`` (experts no token chose in the last step, summed over layers),
``moe/bias_range`` (widest max − min bias over layers), ``moe/aux_coef``. ``on_save`` writes
``moelab_balance.pt`` beside each checkpoint.

The Trainer calls callbacks in order and its ``report_to`` loggers come first, so a callback
added with ``add_callback`` reaches ``trainer.state.log_history`` and the callbacks after it;
:meth:`MoEBalanceCallback.install` puts it first, so every logger gets the metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from moelab.config import BalanceConfig
from moelab.hf.attach import BalanceHandle, attach


class MoEBalanceCallback(TrainerCallback):
    """moelab balancing for a ``transformers.Trainer`` (see the module docstring).

    balance: the config (default ``BalanceConfig(bias_rate=1e-3, aux_coef=1e-3,
    aux_scope="global")``, the ``moelab finetune`` defaults). freeze_router: no gradient to the
    router weights. disable_own_aux: switch the model's built-in aux loss off (default).
    """

    def __init__(
        self,
        balance: BalanceConfig | None = None,
        *,
        freeze_router: bool = False,
        disable_own_aux: bool = True,
    ) -> None:
        from moelab.hf.finetune import balance_from_overrides

        self.balance = balance or balance_from_overrides([])
        self.freeze_router, self.disable_own_aux = freeze_router, disable_own_aux
        self.handle: BalanceHandle | None = None
        self.metrics: dict[str, float] = {}
        self._hook = None

    def install(self, trainer: Any) -> MoEBalanceCallback:
        """Put this callback first in ``trainer``'s list, so every logger sees its metrics."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kw):
        if self.handle is None:
            self.handle = attach(
                model,
                self.balance,
                total_steps=state.max_steps or None,
                disable_own_aux=self.disable_own_aux,
            )
            self.handle.freeze_routers(self.freeze_router)
            self._hook = model.register_forward_hook(self._add_aux)
        return control

    def _add_aux(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Training forwards: loss += the balance terms of this forward."""
        loss = getattr(output, "loss", None)
        if module.training and isinstance(loss, torch.Tensor) and torch.is_grad_enabled():
            output["loss"] = loss + self.handle.aux_loss().to(loss)
        return output

    def on_step_end(self, args, state, control, **kw):
        if self.handle is not None:
            counts = [c.clone() for c in self.handle.step_counts]
            stats = self.handle.end_step()
            self.metrics = routing_health(stats, counts, self.handle.bias)
        return control

    def on_log(self, args, state, control, logs: dict | None = None, **kw):
        if logs is not None and self.metrics and "loss" in logs:
            logs.update(self.metrics)
            if state.log_history:
                state.log_history[-1].update(self.metrics)
        return control

    def on_save(self, args, state, control, **kw):
        if self.handle is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                self.handle.save(folder)
        return control

    def on_train_end(self, args, state, control, **kw):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return control


def routing_health(stats: Any, counts: list[torch.Tensor], bias: list[torch.Tensor]) -> dict:
    """The logged metrics of one optimizer step (``moe/...``; see the module docstring)."""
    out = {"moe/maxvio": stats.maxvio, "moe/aux_coef": stats.aux_coef}
    for i, v in enumerate(stats.maxvio_layers):
        out[f"moe/maxvio/{i}"] = v
    out["moe/dead_experts"] = int(sum(int((c == 0).sum()) for c in counts))
    out["moe/bias_range"] = max(float(b.max() - b.min()) for b in bias)
    return out
