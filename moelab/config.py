"""Typed dataclass configs, TOML loading, ``--set key=value`` overrides and validation.

Every config is a frozen dataclass validated in ``__post_init__``; a bad value raises a
``ValueError`` that names the field and the allowed values. Nested configs load from plain
dicts (TOML tables) with :func:`from_dict`, which rejects unknown keys and suggests the closest
valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import tomllib

T = TypeVar("T")


class TopOneGateWarning(UserWarning):
    """``moe.top_k=1`` with ``router.normalize=true``: the router gets no LM-loss gradient."""


# ----------------------------------------------------------------------------- validation helpers


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def check_range(
    name: str,
    value: float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number with
    ``lo <= value <= hi`` (open ends optional). NaN and ±inf are refused always: an infinite
    rate or coefficient only turns into NaN steps later, far from its cause."""
    bad = not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
    if not bad and lo is not None:
        bad = value <= lo if lo_open else value < lo
    if not bad and hi is not None:
        bad = value >= hi if hi_open else value > hi
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ValueError(f"{name}={value!r} is out of range; allowed: a finite number in {span}")


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, once per class: resolving the string annotations is
    most of the time of building a config (the lab builds thousands)."""
    return typing.get_type_hints(cls)


def _check_literals(obj: Any) -> None:
    """Check the type of every scalar field of a config dataclass instance: a ``Literal``
    field against its choices, a ``bool`` field for a real bool (``5`` or ``"no"`` is refused,
    not taken as true), an ``int`` field for an integer (``2.0`` and ``true`` are refused),
    a ``float`` field for a number and a ``str`` field for a string. ``X | None`` also
    accepts None. The error is one line naming the key and what is allowed."""
    hints = type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        optional = _resolve_hint(hint) is not hint
        if optional and value is None:
            continue
        _check_type(_qualname(obj, f.name), _resolve_hint(hint), value)


def _check_type(name: str, hint: Any, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` fits the scalar type ``hint``."""
    if get_origin(hint) is Literal:
        check_choice(name, value, get_args(hint))
        return
    is_bool = isinstance(value, bool)
    expected = None
    if hint is bool and not is_bool:
        expected = "choose one of [true, false]"
    elif hint is int and (is_bool or not isinstance(value, numbers.Integral)):
        expected = "expected an integer, e.g. 4 (not 4.0 or a string)"
    elif hint is float and (is_bool or not isinstance(value, numbers.Real)):
        expected = "expected a number, e.g. 0.01"
    elif hint is str and not isinstance(value, str):
        expected = "expected a string in quotes, e.g. 'text'"
    if expected:
        raise ValueError(f"{name}={value!r} is not allowed; {expected}")


def _qualname(obj: Any, name: str) -> str:
    prefix = getattr(type(obj), "_prefix", "")
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------- MoE layer configs

# The one list of score functions (their formulas: ``moelab.routing.SCORE_FNS``).
ScoreFn = Literal["softmax", "sigmoid", "sqrtsoftplus"]
RouterMethod = Literal[
    "topk",
    "expert_choice",
    "sinkhorn",
    "hash",
    "random",
    "uniform",
    "top_p",
    "relu",
    "threshold",
    "sparsemixer",
]
# Methods whose selection comes from per-token scores, so a selection bias changes it.
BIAS_METHODS = ("topk",)


@dataclass(frozen=True)
class RouterConfig:
    """How tokens choose experts (``moelab.routing``).

    method: ``topk`` (token choice, the default), ``expert_choice`` (Zhou et al. 2022; experts pick
        tokens, *non-causal* in a decoder), ``sinkhorn`` (balanced assignment, BASE layers),
        ``hash`` (token id modulo hashing, Roller et al. 2021), ``random`` and ``uniform``
        (round-robin, perfectly balanced; for benchmarks), ``top_p`` (dynamic top-p, Huang
        et al. 2024: experts in order of probability until their mass reaches ``top_p``) and
        ``relu`` (ReMoE, Wang et al. 2025: gates ReLU(logits), sparsity from the adaptive L1
        term ``balance.l1_coef``). With ``top_p`` and ``relu`` a token uses a varying number
        of experts; ``moe.top_k`` is then the nominal number (capacity, ReMoE's target).
        ``threshold`` (expert-threshold routing, arXiv 2603.11535): a token joins every
        expert whose score beats that expert's moving-average threshold (the score at which
        it takes T·k/E tokens of a batch); causal, no aux loss, 0..E experts a token.
        ``sparsemixer`` (Liu et al. 2023; Phi-3.5-MoE): k rounds, each sampling one expert
        among those within a relative 2·``sparsemixer_eps`` of the best logit left, with a
        third-order gradient estimate for the router (a dense router gradient).
    top_p: the probability mass p in (0, 1] of ``method="top_p"`` (softmax scores only).
    sparsemixer_eps: SparseMixer's jitter eps (Phi-3.5-MoE's ``router_jitter_noise``).
    threshold_ema: weight of the old threshold in each step's update of ``method="threshold"``
        (τ ← ema·τ + (1 − ema)·this step's estimate; 0 = each step's estimate as it is).
    logit_softcap: c > 0 soft-caps the gate logits to c·tanh(logits/c) before scores and
        selection (transformers' Laguna ``moe_router_logit_softcapping``); 0 = off.
    gate_bias: a learned bias b (E,) on the gate, logits = x·Wᵀ + b (GPT-OSS; with
        ``topk_before_softmax`` it is GPT-OSS's router: top-k of the logits, softmax over k).
        It takes part in selection *and* gradients, unlike the loss-free selection bias.
    input_norm: ``rms`` normalises the router input before the gate, x·rsqrt(mean(x²) + 1e-6)
        · s · D^-½ with a learned scale s (D,), ones at init (Gemma-4's router); ``none``.
    expert_scale: a learned per-expert scale (E,), ones at init, multiplies each chosen
        expert's gate weight after any renormalisation (Gemma-4's ``per_expert_scale``).
    hash_gate: gate weights of ``method="hash"``: ``uniform`` 1/k (Roller et al. 2021) or
        ``scores``, the learned scores of the hashed experts (renormalised over the k if
        ``normalize``), so the gate still learns while the selection is fixed (DeepSeek-V4).
    score: score function applied to the logits, ``softmax``, ``sigmoid`` (DeepSeek-V3) or
        ``sqrtsoftplus`` = sqrt(softplus(logit)) (DeepSeek-V4; Megatron-Core
        ``moe_router_score_function``); non-softmax scores are renormalised over the chosen k.
    topk_before_softmax: Mixtral style (softmax over the k selected logits) instead of Switch
        style (softmax over all E, then top-k). Only with ``score="softmax"``.
    normalize: renormalise the selected gate weights to sum to 1 per token.
    num_groups, topk_groups: group-limited routing (DeepSeek-V2/V3): experts split into
        ``num_groups`` groups, each token first picks ``topk_groups`` groups, then top-k inside.
    noise: ``none``; ``jitter`` (multiplicative input jitter U(1-eps, 1+eps), Switch);
        ``learned`` (noisy top-k with learned softplus noise, Shazeer et al. 2017 eq. 3-5);
        ``gumbel`` (Gumbel-top-k sampling with temperature ``gumbel_tau``).
    noise_std: eps for jitter; the multiplier of Shazeer's N(0,1)·softplus(x·W_noise) for
        learned noise (use 1.0 for the paper's form); ignored for gumbel.
    noise_anneal_steps: noise (jitter, learned or Gumbel) decays linearly to zero over this
        many optimizer steps (0 = constant).
    straight_through: with gumbel noise, forward weights exactly 1/K, backward through the
        tempered softmax of the perturbed logits (``normalize`` is then ignored).
    soft_warmup_steps: dense soft routing (all experts, weights = scores) annealed linearly to
        hard top-k over this many steps (seed 001). Dense cost while it lasts.
    expert_mask_prob: *expert masking* (seed 001): each expert is removed from selection with
        this probability per forward pass in training. Not dropout inside experts.
    For ``expert_choice``, ``sinkhorn``, ``hash``, ``random`` and ``uniform``, ``normalize`` does
    not apply and a loss-free bias is refused (selection does not come from per-token scores).
    init_std: router weight init std (Switch Table 3 uses a 0.1x-scaled init); 0 = zeros.
    dtype: precision of the gate computation: ``fp32`` (Switch's selective precision, the
        default, also under ``train.dtype = "bf16"``) or ``bf16`` (gate matmul in bfloat16,
        scores and gate weights rounded to bf16: the unstable setting of Switch Table 2).
    sinkhorn_iters: iterations of Sinkhorn normalisation for ``method="sinkhorn"``.
    """

    _prefix = "router"

    method: RouterMethod = "topk"
    score: ScoreFn = "softmax"
    topk_before_softmax: bool = False
    normalize: bool = True
    dtype: Literal["fp32", "bf16"] = "fp32"
    num_groups: int = 1
    topk_groups: int = 1
    noise: Literal["none", "jitter", "learned", "gumbel"] = "none"
    noise_std: float = 1.0e-2
    noise_anneal_steps: int = 0
    gumbel_tau: float = 1.0
    straight_through: bool = False
    soft_warmup_steps: int = 0
    expert_mask_prob: float = 0.0
    init_std: float = 0.02
    sinkhorn_iters: int = 3
    top_p: float = 0.5
    logit_softcap: float = 0.0
    gate_bias: bool = False
    input_norm: Literal["none", "rms"] = "none"
    expert_scale: bool = False
    hash_gate: Literal["uniform", "scores"] = "uniform"
    threshold_ema: float = 0.9
    sparsemixer_eps: float = 0.01

    def __post_init__(self) -> None:
        _check_literals(self)
        check_range("router.top_p", self.top_p, lo=0, hi=1, lo_open=True)
        check_range("router.logit_softcap", self.logit_softcap, lo=0)
        check_range("router.threshold_ema", self.threshold_ema, lo=0, hi=1, hi_open=True)
        check_range("router.sparsemixer_eps", self.sparsemixer_eps, lo=0)
        if self.method == "sparsemixer" and self.score != "softmax":
            raise ValueError(
                f"router.method='sparsemixer' needs router.score='softmax' (got {self.score!r}); "
                "allowed: score='softmax' with it, or another method"
            )
        if self.method == "top_p" and self.score != "softmax":
            raise ValueError(
                f"router.method='top_p' needs router.score='softmax' (got {self.score!r}); "
                "allowed: score='softmax' with it, or another method"
            )
        check_range("router.num_groups", self.num_groups, lo=1)
        check_range("router.topk_groups", self.topk_groups, lo=1, hi=self.num_groups)
        check_range("router.noise_std", self.noise_std, lo=0)
        check_range("router.noise_anneal_steps", self.noise_anneal_steps, lo=0)
        check_range("router.gumbel_tau", self.gumbel_tau, lo=0, lo_open=True)
        check_range("router.soft_warmup_steps", self.soft_warmup_steps, lo=0)
        check_range("router.expert_mask_prob", self.expert_mask_prob, lo=0, hi=1, hi_open=True)
        check_range("router.init_std", self.init_std, lo=0)
        check_range("router.sinkhorn_iters", self.sinkhorn_iters, lo=1)
        if self.straight_through and self.noise != "gumbel":
            raise ValueError(
                "router.straight_through=True needs router.noise='gumbel' "
                f"(got {self.noise!r}); allowed: noise='gumbel' or straight_through=False"
            )
        if self.method != "topk" and (self.soft_warmup_steps or self.expert_mask_prob):
            raise ValueError(
                "router.soft_warmup_steps and router.expert_mask_prob apply to "
                f"router.method='topk' only (got method={self.method!r})"
            )
        if self.topk_before_softmax and self.score != "softmax":
            raise ValueError(
                "router.topk_before_softmax=True needs router.score='softmax' "
                f"(got {self.score!r}); allowed: score='softmax' or topk_before_softmax=False"
            )


@dataclass(frozen=True)
class BalanceConfig:
    """Load-balancing terms (``moelab.balance``); every coefficient defaults to off (0).

    Conventions (see docs/balance.md): ``aux_coef`` multiplies the Switch/DeepSeek loss
    E/(K·T)·Σ c_i·P_i, which equals 1.0 under perfect balance. transformers'
    ``router_aux_loss_coef`` multiplies K times this value, so ours = theirs × K.

    aux_scope: where the counts c_i come from: ``micro`` (this micro-batch), ``global`` (counts
        accumulated over the gradient-accumulation steps of this optimizer step and, under
        expert parallelism, all-reduced over data-parallel ranks; Qiu et al. 2025).
        ``sequence`` is the old spelling of ``seq_aux_coef``: ``aux_coef=c, aux_scope="sequence"``
        is read as ``seq_aux_coef=c`` (aux_coef 0, scope micro).
    seq_aux_coef: the sequence-wise Switch loss (each sequence separately, averaged;
        DeepSeek-V3 eq. 17-20, complementary loss, paper value 1e-4), usable with the bias and
        with the micro or global Switch loss.
    device_coef / comm_coef: DeepSeek-V2 device-level and communication balance losses over
        ``balance.num_devices`` expert groups (real placement under expert parallelism).
    importance_coef / load_coef: Shazeer et al. 2017 CV² of importance and of the smooth load.
    z_coef: router z-loss (ST-MoE). entropy_coef: raise per-token routing entropy.
    batch_entropy_coef: raise the entropy of the batch-mean routing distribution.
    overflow_coef: penalise router probability sent to experts over capacity.
    bias_rate: loss-free balancing update rate u (Wang et al. 2024, Alg. 1); 0 = off.
    bias_rule: ``sign`` (Alg. 1: b_i += u·sign(mean − c_i)), ``proportional``
        (b_i += u·(mean − c_i)/mean, so u does not depend on the batch size),
        ``multiplicative`` (b_i += u·log((mean + 1)/(c_i + 1)), i.e. multiplies the selection
        odds; +1 keeps empty experts finite) — moelab's scale-free forms, *not* the rules of
        Wang et al. Tables 3-4 (raw-count u·e_i, and a multiplicative bias on the scores),
        whose numbers they must not be compared with — or ``quantile``: Quantile Balancing (Su 2026,
        "MoE World Tour 6"; Megatron-LM ``quantile_balancing``), which needs no rate: the bias
        is −β, β_i the price at which ⌈T·k/E⌉ tokens still prefer expert i
        (``moelab.balance.quantile_prices``), estimated each step.
    quantile_ema: with ``bias_rule="quantile"``: β ← ema·β + (1 − ema)·estimate, in [0, 1)
        (0 = each step's estimate as it is).
    bias_schedule: rate over training: ``constant``, ``linear`` or ``cosine`` decay to 0.
    bias_center: re-centre the bias to zero mean after each update.
    adaptive_target: adaptive-λ: raise ``aux_coef`` while MaxVio_batch exceeds this
        (0 = off), by the factor (1 + adaptive_rate), lower it otherwise, within
        [adaptive_min, adaptive_max].
    l1_coef: ReMoE's load-balanced L1 term on the ReLU gates (``router.method="relu"``;
        Wang, Zhu & Chen, ICLR 2025), its starting λ (paper 1e-8); 0 = off. λ is live: after
        each step it is multiplied by (1 + l1_rate) while tokens use more than ``moe.top_k``
        experts on average, divided by it while they use fewer (paper α = 1.2).
    simbal_coef: SimBal (arXiv 2506.14038): ‖R·Rᵀ − I‖₁ on the router's expert rows R,
        pushing them toward orthonormal (``balance.simbal_loss``).
    null_target, null_rate: with ``moe.null_experts``, a selection bias shared by the null
        experts is steered toward ``null_target`` real experts a token (LongCat-Flash's
        controller; 0 = off): after each step b_null += null_rate · (real experts a token −
        null_target), so more tokens pick a null expert while they use too many real ones (the
        integral action of a PID controller; the bias is the integral of the error).
    """

    _prefix = "balance"

    aux_coef: float = 0.0
    aux_scope: Literal["micro", "sequence", "global"] = "micro"
    seq_aux_coef: float = 0.0
    device_coef: float = 0.0
    comm_coef: float = 0.0
    num_devices: int = 1
    importance_coef: float = 0.0
    load_coef: float = 0.0
    z_coef: float = 0.0
    entropy_coef: float = 0.0
    batch_entropy_coef: float = 0.0
    overflow_coef: float = 0.0
    bias_rate: float = 0.0
    bias_rule: Literal["sign", "proportional", "multiplicative", "quantile"] = "sign"
    quantile_ema: float = 0.0
    bias_schedule: Literal["constant", "linear", "cosine"] = "constant"
    bias_center: bool = False
    adaptive_target: float = 0.0
    adaptive_rate: float = 0.05
    adaptive_min: float = 1.0e-4
    adaptive_max: float = 1.0
    l1_coef: float = 0.0
    l1_rate: float = 0.2
    simbal_coef: float = 0.0
    null_target: float = 0.0
    null_rate: float = 1.0e-3

    def __post_init__(self) -> None:
        _check_literals(self)
        for name in (
            "aux_coef",
            "seq_aux_coef",
            "device_coef",
            "comm_coef",
            "importance_coef",
            "load_coef",
            "z_coef",
            "entropy_coef",
            "batch_entropy_coef",
            "overflow_coef",
            "bias_rate",
            "adaptive_target",
            "adaptive_rate",
            "adaptive_min",
            "l1_coef",
            "l1_rate",
            "simbal_coef",
            "null_target",
            "null_rate",
        ):
            check_range(f"balance.{name}", getattr(self, name), lo=0)
        check_range("balance.num_devices", self.num_devices, lo=1)
        check_range("balance.adaptive_max", self.adaptive_max, lo=0)
        if self.adaptive_min > self.adaptive_max:
            raise ValueError(
                f"balance.adaptive_min={self.adaptive_min!r} exceeds balance.adaptive_max="
                f"{self.adaptive_max!r}; allowed: adaptive_min <= adaptive_max"
            )
        check_range("balance.quantile_ema", self.quantile_ema, lo=0, hi=1, hi_open=True)
        if self.bias_rule == "quantile" and self.bias_rate > 0:
            raise ValueError(
                "balance.bias_rate is not used by balance.bias_rule='quantile' (Quantile Balancing "
                "needs no rate); allowed: bias_rate=0 with it, or another bias_rule"
            )
        if self.aux_scope == "sequence":
            self._map_sequence_scope()

    @property
    def bias_on(self) -> bool:
        """Whether a loss-free bias takes part in selection (a rate, or Quantile Balancing)."""
        return self.bias_rate > 0 or self.bias_rule == "quantile"

    def _map_sequence_scope(self) -> None:
        """``aux_scope="sequence"`` (old spelling) -> ``seq_aux_coef``: one sequence loss."""
        if self.seq_aux_coef > 0 and self.aux_coef > 0:
            raise ValueError(
                "balance.aux_scope='sequence' and balance.seq_aux_coef both set the sequence-wise "
                "loss; allowed: one of them (aux_scope='sequence' is the old spelling of "
                "seq_aux_coef)"
            )
        if self.adaptive_target > 0:
            raise ValueError(
                "balance.aux_scope='sequence' (now balance.seq_aux_coef) has no adaptive λ; "
                "allowed with balance.adaptive_target > 0: aux_scope 'micro' or 'global'"
            )
        object.__setattr__(self, "seq_aux_coef", self.seq_aux_coef or self.aux_coef)
        object.__setattr__(self, "aux_coef", 0.0)
        object.__setattr__(self, "aux_scope", "micro")


@dataclass(frozen=True)
class CapacityConfig:
    """Expert capacity C = ceil(T·K/E·CF) and token dropping (``moelab.dispatch``).

    factor: training capacity factor CF; ``0`` means dropless (no capacity).
    eval_factor: capacity factor in eval mode; ``-1`` = same as ``factor``, ``0`` = dropless.
    policy: which token-slots an over-full expert drops: ``score`` (lowest gate weight first)
        or ``position`` (later tokens first, as in Switch/GShard).
    reroute: send a dropped slot to the token's next-best expert that still has room
        (Switch's "No-Token-Left-Behind"); else it passes through the residual.
    """

    _prefix = "capacity"

    factor: float = 0.0
    eval_factor: float = -1.0
    policy: Literal["score", "position"] = "score"
    reroute: bool = False

    def __post_init__(self) -> None:
        _check_literals(self)
        check_range("capacity.factor", self.factor, lo=0)
        if self.eval_factor != -1:
            check_range("capacity.eval_factor", self.eval_factor, lo=0)

    def factor_for(self, training: bool) -> float:
        """Capacity factor in force (0 = dropless)."""
        return self.factor if training or self.eval_factor == -1 else self.eval_factor


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: ``MoEConfig(d_model=..., num_experts=..., top_k=..., d_expert=...)``.

    The defaults give a dropless softmax top-k SwiGLU layer with no balancing.
    num_shared: always-on shared experts of hidden size ``d_shared`` (default ``d_expert``).
    expert_dropout: dropout inside experts (Switch "expert dropout"), not expert masking.
    expert_init: ``normal`` (same std for every expert) or ``diverse`` (std varies per expert
        in [0.5, 1.5]× to break symmetry, seed 001).
    init_std: std of the expert input projections; output projections use init_std/sqrt(2).
    null_experts: Z zero-computation experts beside the E real ones (MoE++, Jin et al. ICLR
        2025; LongCat-Flash 2025): the router scores E + Z experts and a slot that picks a null
        expert returns its gate weight × the input (an identity expert), so a token may use
        fewer than top_k real experts. Balance terms, counts, capacity and the loss-free bias
        cover the E real experts only; ``experts_per_token`` logs the real experts a token.
    default_outputs, default_ema: Default MoE (Panda et al. 2025): each expert keeps an
        exponential moving average ê_i of its outputs (weight ``default_ema`` on the old value)
        and the router gets, for every expert a token did not choose, the gradient as if that
        expert had answered ê_i (a dense router gradient; the forward output is unchanged;
        ``moelab.default_outputs``). One process only (not with expert parallelism).
    hash_layers: the first N MoE layers route by a fixed hash of the token id, their gate
        weights the learned scores of the hashed experts (DeepSeek-V4 §2.1's hash layers;
        :meth:`hash_layer` is their config); the other layers route as ``router`` says.
    """

    _prefix = "moe"

    d_model: int
    num_experts: int
    top_k: int
    d_expert: int
    num_shared: int = 0
    d_shared: int = 0
    expert_dropout: float = 0.0
    expert_init: Literal["normal", "diverse"] = "normal"
    init_std: float = 0.02
    router: RouterConfig = field(default_factory=RouterConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    hash_layers: int = 0
    null_experts: int = 0
    default_outputs: bool = False
    default_ema: float = 0.99

    def __post_init__(self) -> None:
        _check_literals(self)
        check_range("moe.d_model", self.d_model, lo=1)
        check_range("moe.hash_layers", self.hash_layers, lo=0)
        check_range("moe.null_experts", self.null_experts, lo=0)
        check_range("moe.default_ema", self.default_ema, lo=0, hi=1, hi_open=True)
        check_range("moe.num_experts", self.num_experts, lo=1)
        check_range("moe.d_expert", self.d_expert, lo=1)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe.top_k={self.top_k!r} is out of range; allowed: an integer in "
                f"[1, moe.num_experts={self.num_experts}]"
            )
        if self.null_experts:
            self._check_null_experts()
        if self.balance.null_target > 0:
            if not self.null_experts:
                raise ValueError(
                    "balance.null_target > 0 steers the null experts' bias and needs "
                    "moe.null_experts > 0; allowed: null_target=0 or some null experts"
                )
            check_range("balance.null_target", self.balance.null_target, lo=0, hi=self.top_k)
        check_range("moe.num_shared", self.num_shared, lo=0)
        check_range("moe.d_shared", self.d_shared, lo=0)
        check_range("moe.expert_dropout", self.expert_dropout, lo=0, hi=1, hi_open=True)
        check_range("moe.init_std", self.init_std, lo=0)
        self._check_router()
        self._check_balance_needs()

    def _check_router(self) -> None:
        """Group-limited routing fits the experts; top-1 with renormalised weights is warned."""
        r = self.router
        if self.num_experts % r.num_groups:
            raise ValueError(
                f"router.num_groups={r.num_groups} must divide moe.num_experts="
                f"{self.num_experts}; allowed: a divisor of {self.num_experts}"
            )
        per_group = self.num_experts // r.num_groups
        if r.num_groups > 1 and self.top_k > r.topk_groups * per_group:
            raise ValueError(
                f"moe.top_k={self.top_k} exceeds the experts in router.topk_groups="
                f"{r.topk_groups} of the router.num_groups={r.num_groups} groups of {per_group}; "
                f"allowed: top_k <= {r.topk_groups * per_group}"
            )
        if self.top_k == 1 and r.normalize and r.method == "topk" and r.noise != "gumbel":
            warnings.warn(
                "moe.top_k=1 with router.normalize=true: each token's gate weight is exactly 1, "
                "so the router gets no gradient from the LM loss (only from balance terms); "
                "set router.normalize=false to scale the expert output by p_i as Switch does",
                TopOneGateWarning,
                stacklevel=3,
            )

    def _check_balance_needs(self) -> None:
        """Balance terms that need a particular router (learned noise, ReLU gates) or layout."""
        r = self.router
        if self.balance.load_coef > 0 and r.noise != "learned":
            raise ValueError(
                "balance.load_coef > 0 (Shazeer's smooth load loss) needs "
                f"router.noise='learned' (got {r.noise!r})"
            )
        if self.balance.l1_coef > 0 and r.method != "relu":
            raise ValueError(
                "balance.l1_coef > 0 (ReMoE's L1 on ReLU gates) needs router.method='relu' "
                f"(got {r.method!r}); allowed: method='relu' or l1_coef=0"
            )
        if self.num_experts % self.balance.num_devices:
            raise ValueError(
                f"balance.num_devices={self.balance.num_devices} must divide moe.num_experts="
                f"{self.num_experts}"
            )

    def check_bias_applies(self) -> None:
        """Refuse a loss-free bias on a routing method whose selection ignores it (checked when
        a layer is built and in a run's model config; a lone MoEConfig may still carry one)."""
        b = self.balance
        if b.bias_on and self.router.method not in BIAS_METHODS:
            which = "bias_rule='quantile'" if b.bias_rule == "quantile" else "bias_rate > 0"
            raise ValueError(
                f"balance.{which} (loss-free bias) does nothing with router.method="
                f"{self.router.method!r}, whose selection ignores a bias; allowed: "
                f"router.method in {list(BIAS_METHODS)} or no balance.bias_rate / bias_rule"
            )
        if b.bias_rule == "quantile" and self.top_k >= self.num_experts:
            raise ValueError(
                f"balance.bias_rule='quantile' needs moe.top_k < moe.num_experts (a (k+1)-th "
                f"choice per token); got top_k={self.top_k}, num_experts={self.num_experts}"
            )

    def _check_null_experts(self) -> None:
        """Null experts need token-choice top-k scoring E + Z experts per token."""
        r, b = self.router, self.balance
        bad = [
            (r.method != "topk", f"router.method={r.method!r}", "router.method='topk'"),
            (r.noise == "learned", "router.noise='learned'", "another router.noise"),
            (b.bias_rule == "quantile", "balance.bias_rule='quantile'", "another bias_rule"),
            (self.hash_layers > 0, f"moe.hash_layers={self.hash_layers}", "hash_layers=0"),
        ]
        for hit, got, allowed in bad:
            if hit:
                raise ValueError(
                    f"moe.null_experts={self.null_experts} does not work with {got}; "
                    f"allowed: {allowed} or null_experts=0"
                )

    def hash_layer(self) -> MoEConfig:
        """The config of one of the first ``hash_layers`` MoE layers: ``router.method="hash"``
        with ``hash_gate="scores"``; the selection-only router options (noise, masking, soft
        warm-up, groups) and the loss-free bias, which a fixed selection ignores, are off."""
        r = dataclasses.replace(
            self.router, method="hash", hash_gate="scores", noise="none",
            straight_through=False, soft_warmup_steps=0, expert_mask_prob=0.0, num_groups=1,
            topk_groups=1,
        )  # fmt: skip
        b = dataclasses.replace(self.balance, bias_rate=0.0, bias_rule="sign", load_coef=0.0)
        return dataclasses.replace(self, router=r, balance=b, hash_layers=0)

    @property
    def shared_hidden(self) -> int:
        """Hidden size of each shared expert."""
        return self.d_shared or self.d_expert


# ----------------------------------------------------------------------------- dict / TOML I/O


def _resolve_hint(hint: Any) -> Any:
    """Strip ``X | None`` to ``X``."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion.

    Nested dataclass fields accept dicts; ints are accepted for float fields.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a table of settings, got {data!r}")
    hints = type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ValueError(f"unknown setting {path!r}{_suggest(key, fields, where)}")
        kwargs[key] = _field_value(_resolve_hint(hints[key]), value, path)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        missing = [n for n, f in fields.items() if n not in kwargs and _required(f)]
        raise ValueError(f"{where or cls.__name__}: missing setting(s) {missing}") from exc


def _field_value(hint: Any, value: Any, path: str) -> Any:
    """``value`` as field type ``hint`` wants it: a table as its dataclass, an int as a float,
    a list as a tuple; a scalar where a table or a list belongs is refused naming ``path``."""
    if dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return from_dict(hint, value, where=path)
        if value is not None:
            raise ValueError(f"{path}={value!r} is not allowed; expected a table of settings")
    elif hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif hint is tuple or get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}={value!r} is not allowed; expected a list, e.g. ['a', 'b']")
        return tuple(value)
    return value


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _suggest(key: str, fields: dict, where: str) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    prefix = f"{where}." if where else ""
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return f"{hint} valid keys: {sorted(fields)}"


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly nested dict of a dataclass config."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value as TOML (numbers, booleans, strings, lists); bare words stay str."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested dict (a copy); validation happens later."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set model.moe.top_k=2")
        key, text = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part!r} is a value, not a table")
        node[parts[-1]] = parse_value(text.strip())
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file (or, by its ``.json`` suffix, a run's config.json) into a dict, with a
    clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(p)!r} does not exist")
    kind, parse = ("JSON", json.loads) if p.suffix == ".json" else ("TOML", tomllib.loads)
    try:
        return parse(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {str(p)!r} is not valid {kind}: {exc}") from exc
