"""The router module: a linear fp32 gate x (T, D) -> logits (T, E) -> ``Routing`` for every
``RouterConfig`` option, with the training-only parts (input jitter, learned noise, Gumbel
sampling, expert masking, soft warm-up, each annealed) on top of :mod:`moelab.routing`.

Shape legend as in :mod:`moelab.routing`: T tokens, D model dim, E experts, K slots per token.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import RouterConfig
from moelab.routing import (
    Routing,
    anneal,
    check_groups,
    check_inputs,
    expert_choice_route,
    fixed_routing,
    gate_weights,
    hash_experts,
    random_experts,
    relu_route,
    route,
    score_fn,
    sinkhorn_route,
    soften,
    sparsemixer_route,
    threshold_route,
    top_p_route,
    uniform_experts,
)

# ----------------------------------------------------------------------------- training noise


def gumbel(shape: torch.Size, device: torch.device) -> Tensor:
    """Standard Gumbel noise −log(−log U)."""
    u = torch.rand(shape, device=device).clamp_(torch.finfo(torch.float32).tiny, 1.0)
    return -torch.log(-torch.log(u))


def expert_mask_bias(num_experts: int, k: int, prob: float, device=None) -> Tensor:
    """Selection bias (E,): −inf for experts masked this forward (each with ``prob``), else 0.

    The k experts with the largest uniform draws are always kept, so at least k remain. With
    group-limited routing a group whose top-2 includes a masked expert scores −inf; if the kept
    groups then hold fewer than k unmasked experts, top-k falls back to masked ones.
    """
    u_E = torch.rand(num_experts, device=device)
    keep_E = u_E >= prob
    keep_E[u_E.topk(k).indices] = True
    return torch.zeros(num_experts, device=device).masked_fill(~keep_E, float("-inf"))


def straight_through(logits_TE: Tensor, noise_TE: Tensor, experts_TK: Tensor, tau: float) -> Tensor:
    """Straight-through Gumbel weights (T, K): forward exactly 1/K each, backward the gradient of
    the tempered Gumbel-softmax softmax(logits/tau + g) gathered at the chosen experts and
    renormalised over the K slots (Jang et al. 2017 §2.2, extended to top-k)."""
    soft_TK = (logits_TE / tau + noise_TE).softmax(-1).gather(1, experts_TK)
    soft_TK = soft_TK / soft_TK.sum(-1, keepdim=True)
    return soft_TK - soft_TK.detach() + 1.0 / experts_TK.shape[1]


# ----------------------------------------------------------------------------- module


def _as_fp32(r: Routing) -> Routing:
    """A bf16 router's Routing handed on in fp32: every floating tensor rounded to bfloat16
    (differentiable casts) and back, so scores and gate weights carry bf16 precision."""
    cast = {
        f.name: getattr(r, f.name).bfloat16().float()
        for f in dataclasses.fields(r)
        if isinstance(getattr(r, f.name), Tensor) and getattr(r, f.name).is_floating_point()
    }
    return dataclasses.replace(r, **cast)


RMS_EPS = 1e-6  # router.input_norm="rms": Gemma-4's rms_norm_eps default


class Router(nn.Module):
    """Linear fp32 gate x (T, D) -> logits (T, E) -> Routing, implementing every RouterConfig
    option (noise, annealing, expert masking, soft warm-up, all methods)."""

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        check_groups(num_experts, top_k, cfg.num_groups, cfg.topk_groups)
        self.cfg, self.num_experts, self.top_k = cfg, num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=torch.float32))
        if cfg.noise == "learned":  # Shazeer et al. 2017 eq. 4: W_noise, zero init
            self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))
        if cfg.gate_bias:  # GPT-OSS: a learned bias on the gate, zero init
            self.gate_bias = nn.Parameter(torch.zeros(num_experts))
        if cfg.input_norm == "rms":  # Gemma-4: learned scale of the normalised input
            self.input_scale = nn.Parameter(torch.ones(d_model))
        if cfg.expert_scale:  # Gemma-4: learned scale of each expert's gate weight
            self.expert_scale = nn.Parameter(torch.ones(num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight ~ N(0, init_std²) (zeros if init_std = 0); noise_weight, gate_bias zeros;
        input_scale, expert_scale ones."""
        if self.cfg.init_std > 0:
            nn.init.normal_(self.weight, std=self.cfg.init_std)
        else:
            nn.init.zeros_(self.weight)
        if hasattr(self, "noise_weight"):
            nn.init.zeros_(self.noise_weight)
        if hasattr(self, "gate_bias"):
            nn.init.zeros_(self.gate_bias)
        for name in ("input_scale", "expert_scale"):
            if hasattr(self, name):
                nn.init.ones_(getattr(self, name))

    def _apply(self, fn, recurse: bool = True) -> Router:
        """Keep the gate parameters fp32 under ``module.to(bf16)`` (Switch selective precision)."""
        super()._apply(fn, recurse)
        for p in self.parameters(recurse=False):
            if p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def forward(
        self,
        x: Tensor,
        *,
        bias: Tensor | None = None,
        step: int = 0,
        token_ids: Tensor | None = None,
    ) -> Routing:
        """Route x (T, D) (leading dims are flattened) at training step ``step``.

        The gate runs with autocast off whatever the input dtype: in fp32 (Switch §2.4's
        selective precision, the default) or, with ``router.dtype = "bf16"``, in bfloat16:
        input, weight and logits in bf16, scores and gate weights rounded to bf16 (handed on as
        fp32 tensors holding bf16 values), the unstable setting of Switch Table 2.
        ``bias`` (E,): loss-free selection bias (``topk`` only; the other methods balance by
        construction or ignore the scores). ``token_ids`` (T,): needed by ``hash``.
        """
        x_TD = x.reshape(-1, x.shape[-1])
        dtype = torch.bfloat16 if self.cfg.dtype == "bf16" else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            routing = self._route(self._normed(x_TD.to(dtype)), bias, step, token_ids)
            if self.cfg.expert_scale:
                scale_TK = self.expert_scale.to(dtype)[routing.experts]
                routing = dataclasses.replace(routing, weights=routing.weights * scale_TK)
        return routing if dtype == torch.float32 else _as_fp32(routing)

    def _normed(self, x_TD: Tensor) -> Tensor:
        """Gemma-4's router input (``input_norm="rms"``): x·(mean(x²) + ε)^-½ · s · D^-½, the
        norm in fp32 and cast back; x itself otherwise."""
        if self.cfg.input_norm == "none":
            return x_TD
        x32 = x_TD.float()
        normed = (x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + RMS_EPS, -0.5)).to(x_TD)
        return normed * self.input_scale.to(x_TD.dtype) * x_TD.shape[-1] ** -0.5

    def _route(
        self, x_TD: Tensor, bias: Tensor | None, step: int, token_ids: Tensor | None
    ) -> Routing:
        method = self.cfg.method
        if method == "topk":
            return self._topk(x_TD, bias, step)
        logits_TE = self._logits(x_TD)
        if method == "expert_choice":
            return expert_choice_route(logits_TE, self.top_k, score=self.cfg.score)
        if method == "sinkhorn":
            return self._sinkhorn(logits_TE)
        if method == "top_p":
            return top_p_route(logits_TE, self.cfg.top_p, normalize=self.cfg.normalize)
        if method == "relu":
            return relu_route(logits_TE, score=self.cfg.score)
        if method == "sparsemixer":
            eps = self.cfg.sparsemixer_eps
            return sparsemixer_route(logits_TE, self.top_k, eps=eps, training=self.training)
        if method == "threshold":  # the layer's Balancer keeps τ as the bias −τ
            tau = None if bias is None else -bias
            return threshold_route(logits_TE, self.top_k, threshold=tau, score=self.cfg.score)
        return self._fixed(logits_TE, token_ids)

    def _logits(self, x_TD: Tensor) -> Tensor:
        """Gate logits (T, E) = x·Wᵀ (+ b, GPT-OSS's learned gate bias), soft-capped to
        (−c, c) by c·tanh(logits/c) when ``logit_softcap`` c > 0 (Laguna)."""
        b_E = self.gate_bias.to(x_TD.dtype) if self.cfg.gate_bias else None
        logits_TE = F.linear(x_TD, self.weight.to(x_TD.dtype), b_E)
        c = self.cfg.logit_softcap
        return logits_TE if c <= 0 else torch.tanh(logits_TE / c) * c

    def _topk(self, x_TD: Tensor, bias: Tensor | None, step: int) -> Routing:
        """Token-choice top-k with the training-only noise, masking and soft warm-up."""
        cfg, train = self.cfg, self.training
        scale = anneal(step, cfg.noise_anneal_steps) if train else 0.0
        if cfg.noise == "jitter" and scale > 0:  # Switch: multiplicative input jitter
            eps = cfg.noise_std * scale
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = self._logits(x_TD)
        if train and cfg.expert_mask_prob > 0:
            mask_E = expert_mask_bias(
                self.num_experts, self.top_k, cfg.expert_mask_prob, x_TD.device
            )
            bias = mask_E if bias is None else bias + mask_E
        if cfg.noise == "learned" and train:
            routing = self._learned_noise(x_TD, logits_TE, bias, scale)
        elif cfg.noise == "gumbel" and train:
            routing = self._gumbel(logits_TE, bias, scale)
        else:
            routing = route(logits_TE, self.top_k, bias=bias, **self._route_kwargs())
        if train and step < cfg.soft_warmup_steps:
            alpha = anneal(step, cfg.soft_warmup_steps)
            routing = soften(routing, alpha, normalize=cfg.normalize)
        return routing

    def _route_kwargs(self) -> dict:
        cfg = self.cfg
        return dict(
            score=cfg.score,
            normalize=cfg.normalize,
            topk_before_softmax=cfg.topk_before_softmax,
            num_groups=cfg.num_groups,
            topk_groups=cfg.topk_groups,
        )

    def _learned_noise(
        self, x_TD: Tensor, logits_TE: Tensor, bias: Tensor | None, scale: float
    ) -> Routing:
        """Noisy top-k (Shazeer et al. 2017 eq. 3-4): H = x·W + N(0,1)·softplus(x·W_noise)·scale.

        Both the selection and the score function use H; the clean logits and the noise std are
        returned for the smooth load loss (eq. 8-10).
        """
        std_TE = F.softplus(F.linear(x_TD, self.noise_weight.to(x_TD.dtype))) * (
            self.cfg.noise_std * scale
        )
        noisy_TE = logits_TE + torch.randn_like(logits_TE) * std_TE
        routing = route(noisy_TE, self.top_k, bias=bias, **self._route_kwargs())
        return dataclasses.replace(routing, clean_logits=logits_TE, noise_std=std_TE)

    def _gumbel(self, logits_TE: Tensor, bias: Tensor | None, scale: float) -> Routing:
        """Gumbel-top-k: select the top-k of logits/tau + scale·g (k samples without replacement
        from softmax(logits/tau); Kool et al. 2019), weights from the clean scores.

        ``logits``/``scores`` in the result are the clean ones: the sampling noise is not part of
        the router output (z-loss on it would penalise the noise). With ``straight_through`` the
        forward weights are 1/K each and the backward is the tempered softmax (see
        :func:`straight_through`).
        """
        cfg, kw = self.cfg, self._route_kwargs()
        noise_TE = gumbel(logits_TE.shape, logits_TE.device) * scale
        # top-k of (logits + tau·g) == top-k of (logits/tau + g); scores are monotone in logits.
        sampled = route(logits_TE.detach() + cfg.gumbel_tau * noise_TE, self.top_k, bias=bias, **kw)
        scores_TE = score_fn(logits_TE, cfg.score)
        experts_TK = sampled.experts
        if cfg.straight_through:
            weights_TK = straight_through(logits_TE, noise_TE, experts_TK, cfg.gumbel_tau)
        else:
            weights_TK = gate_weights(
                logits_TE,
                scores_TE,
                experts_TK,
                normalize=cfg.normalize,
                topk_before_softmax=cfg.topk_before_softmax,
            )
        return Routing(logits_TE, scores_TE, weights_TK, experts_TK)

    def _sinkhorn(self, logits_TE: Tensor) -> Routing:
        cfg = self.cfg
        return sinkhorn_route(
            logits_TE,
            self.top_k,
            iters=cfg.sinkhorn_iters,
            score=cfg.score,
            normalize=cfg.normalize,
            num_groups=cfg.num_groups,
            topk_groups=cfg.topk_groups,
        )

    def _fixed(self, logits_TE: Tensor, token_ids: Tensor | None) -> Routing:
        """hash / random / uniform: experts independent of the logits, weights 1/k (or, for
        hash with ``hash_gate="scores"``, the scores of the hashed experts)."""
        T, E, k, method = logits_TE.shape[0], self.num_experts, self.top_k, self.cfg.method
        check_inputs(logits_TE, k, self.cfg.score, None)
        if method == "hash":
            if token_ids is None:
                raise ValueError(
                    "router.method='hash' needs token_ids; allowed: pass token_ids (T,) or use "
                    "another router.method"
                )
            if token_ids.numel() != T:
                raise ValueError(f"token_ids has {token_ids.numel()} elements; allowed: {T}")
            experts_TK = hash_experts(token_ids, k, E)
        elif method == "random":
            experts_TK = random_experts(T, k, E, logits_TE.device)
        else:
            experts_TK = uniform_experts(T, k, E, logits_TE.device)
        if method == "hash" and self.cfg.hash_gate == "scores":  # DeepSeek-V4's hash layers
            scores_TE = score_fn(logits_TE, self.cfg.score)
            c = self.cfg
            weights_TK = gate_weights(
                logits_TE, scores_TE, experts_TK, normalize=c.normalize,
                topk_before_softmax=c.topk_before_softmax,
            )  # fmt: skip
            return Routing(logits_TE, scores_TE, weights_TK, experts_TK)
        return fixed_routing(logits_TE, experts_TK, score=self.cfg.score)
