"""Which balancing a transformers MoE model has as configured, and where HF's own loss misfits.

transformers computes its router aux loss (``load_balancing_loss_func``) only when
``config.output_router_logits`` is true, as a Switch loss on the *softmax of the recorded router
tensor*, with counts from top-k of that softmax, pooled over all MoE layers, not divided by k,
times ``router_aux_loss_coef``; no family ever updates its ``e_score_correction_bias``. That is
the wrong loss where the router scores with sigmoid / sqrtsoftplus, records probabilities, or
chooses with a bias: :func:`balancing_status` says so, per model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moelab.hf.routers import RouterSite

HF_CONVENTION = (
    "Switch loss on softmax(recorded router tensor), counts from its top-k, pooled over all "
    "MoE layers, not divided by k (transformers load_balancing_loss_func)"
)


def _config_value(model: nn.Module, name: str) -> Any:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(config, name, None)
    return getattr(text, name, None) if value is None else value


def hf_warnings(sites: list[RouterSite]) -> list[str]:
    """One line per way HF's aux loss does not fit this model's routers."""
    out = []
    scores = sorted({s.score for s in sites if not s.probs_recorded and s.rule is not None})
    if any(x != "softmax" for x in scores):
        out.append(
            f"routers score with {'/'.join(x for x in scores if x != 'softmax')}, but HF's aux "
            "loss takes a softmax of their logits"
        )
    if any(s.probs_recorded for s in sites):
        out.append("routers record probabilities: HF's aux loss takes a softmax of probabilities")
    if any(s.bias_slot() is not None for s in sites):
        out.append(
            "routers choose with a selection bias that transformers never updates (frozen); HF's "
            "aux loss counts top-k of the unbiased softmax, not the experts really chosen"
        )
    return out


def balancing_status(model: nn.Module, sites: list[RouterSite]) -> dict[str, Any]:
    """The balancing active in ``model`` as configured: HF's aux loss (on/off, coefficient,
    convention), the selection biases it holds (frozen in plain transformers) and warnings."""
    on = bool(_config_value(model, "output_router_logits"))
    coef = getattr(model, "router_aux_loss_coef", None)
    coef = _config_value(model, "router_aux_loss_coef") if coef is None else coef
    biases = []
    for s in sites:
        slot = s.bias_slot()
        if slot is not None:
            flat = slot.detach().float().view(-1)[: s.num_experts]
            biases.append(
                {"module": s.name, "range": float(flat.max() - flat.min()), "frozen": True}
            )
    return {
        "hf_aux_loss": "on" if on and coef else "off",
        "output_router_logits": on,
        "router_aux_loss_coef": None if coef is None else float(coef),
        "convention": HF_CONVENTION,
        "selection_bias": biases,
        "warnings": hf_warnings(sites),
    }


def summary(status: dict[str, Any]) -> list[str]:
    """The status as short lines for the CLI."""
    coef = status["router_aux_loss_coef"]
    lines = [
        f"HF aux loss {status['hf_aux_loss']} (output_router_logits="
        f"{status['output_router_logits']}, router_aux_loss_coef={coef})"
    ]
    if status["selection_bias"]:
        widest = max(b["range"] for b in status["selection_bias"])
        lines.append(
            f"selection bias in {len(status['selection_bias'])} routers (frozen in transformers; "
            f"widest range {widest:.3g})"
        )
    lines += [f"warning: {w}" for w in status["warnings"]]
    return lines
