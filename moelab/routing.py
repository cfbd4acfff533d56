"""Router: logits -> ``Routing`` (scores, gate weights, chosen experts) for every routing method.

Shape legend: ``T`` tokens (flattened batch), ``D`` model dim, ``E`` experts, ``K`` top-k slots
per token (``K' = E`` for expert choice and soft warm-up), ``G`` expert groups, ``N`` experts per
group. All routing math runs in fp32. Pure functions first, the ``Router`` module last.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.config import RouterConfig, check_choice

SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Routing:
    """The result of routing T tokens over E experts (see docs/DESIGN.md)."""

    logits: Tensor  # (T, E) fp32 logits used for selection (after noise), for z-loss
    scores: Tensor  # (T, E) after score fn (softmax/sigmoid), before any bias; has grad
    weights: Tensor  # (T, K) gate weights used to combine expert outputs; has grad
    experts: Tensor  # (T, K) int64, preference order (choice 0 = best)
    mask: Tensor | None = None  # (T, K) bool, False = slot unused (expert choice, padding)
    clean_logits: Tensor | None = None  # (T, E) before noise (smooth load loss)
    noise_std: Tensor | None = None  # (T, E) learned-noise std (smooth load loss)

    @property
    def num_experts(self) -> int:
        """E."""
        return self.scores.shape[-1]

    @property
    def top_k(self) -> int:
        """K, the number of slots per token (E for expert choice and soft warm-up)."""
        return self.experts.shape[-1]


def anneal(step: int, steps: int) -> float:
    """Linear decay factor 1 -> 0 over ``steps`` (``steps == 0``: constant 1)."""
    return 1.0 if steps <= 0 else max(0.0, 1.0 - step / steps)


# ----------------------------------------------------------------------------- validation


def _check_inputs(logits_TE: Tensor, k: int, score: str, bias_E: Tensor | None) -> None:
    """Raise ``ValueError`` naming the bad argument and what is allowed."""
    if logits_TE.dim() != 2:
        raise ValueError(
            f"logits has shape {tuple(logits_TE.shape)}; "
            "allowed: a 2-D (tokens, num_experts) tensor"
        )
    E = logits_TE.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(
            f"top_k={k!r} is out of range; allowed: an integer in [1, num_experts={E}]"
        )
    check_choice("score", score, SCORES)
    if bias_E is not None and tuple(bias_E.shape) != (E,):
        raise ValueError(f"bias has shape {tuple(bias_E.shape)}; allowed: shape (num_experts={E},)")
    if not torch.isfinite(logits_TE).all():  # one reduction; a host sync, as any check is
        raise ValueError(
            "router logits contain NaN or inf; allowed: finite values (check the router input, "
            "its init_std and the learning rate)"
        )


def _check_groups(E: int, k: int, num_groups: int, topk_groups: int) -> None:
    """Group-limited routing needs G | E, 1 <= topk_groups <= G and k <= topk_groups·E/G."""
    if num_groups < 1 or E % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide num_experts={E}; allowed: a divisor")
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(
            f"topk_groups={topk_groups} is out of range; allowed: an integer in [1, {num_groups}]"
        )
    if k > topk_groups * (E // num_groups):
        raise ValueError(
            f"top_k={k} exceeds the {topk_groups * (E // num_groups)} experts in topk_groups="
            f"{topk_groups} groups; allowed: top_k <= topk_groups * num_experts / num_groups"
        )


# ----------------------------------------------------------------------------- token-choice top-k


def score_fn(logits_TE: Tensor, score: str) -> Tensor:
    """Router scores (T, E): softmax over experts (Switch eq. 1) or sigmoid (DeepSeek-V3 eq. 15)."""
    return logits_TE.softmax(-1) if score == "softmax" else logits_TE.sigmoid()


def _limit_groups(sel_TE: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    """Mask (-inf) the experts outside each token's best ``topk_groups`` groups (T, E).

    DeepSeek-V3 §2.1 (node-limited) / V2 device-limited routing: a group's score is the sum of
    its two highest scores (the max for one-expert groups).
    """
    T, E = sel_TE.shape
    sel_TGN = sel_TE.view(T, num_groups, E // num_groups)
    group_TG = sel_TGN.topk(min(2, E // num_groups), dim=-1).values.sum(-1)  # (T, G)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_TG.topk(topk_groups, dim=-1).indices, True)
    return sel_TGN.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)


def select_topk(sel_TE: Tensor, k: int, *, num_groups: int = 1, topk_groups: int = 1) -> Tensor:
    """Experts (T, K) int64 with the k highest selection scores, best first (no grad)."""
    if num_groups > 1 and topk_groups < num_groups:
        sel_TE = _limit_groups(sel_TE, num_groups, topk_groups)
    return sel_TE.topk(k, dim=-1).indices


def gate_weights(
    logits_TE: Tensor,
    scores_TE: Tensor,
    experts_TK: Tensor,
    *,
    normalize: bool,
    topk_before_softmax: bool = False,
) -> Tensor:
    """Gate weights (T, K) of the chosen experts from the *unbiased* scores.

    Mixtral (``topk_before_softmax``): softmax over the k selected logits. Otherwise the gathered
    scores, renormalised to sum to 1 if ``normalize`` (DeepSeek-V3 eq. 13, Qwen/OLMoE) or raw
    (Switch eq. 2).
    """
    if topk_before_softmax:
        return logits_TE.gather(1, experts_TK).softmax(-1)
    weights_TK = scores_TE.gather(1, experts_TK)
    return weights_TK / weights_TK.sum(-1, keepdim=True) if normalize else weights_TK


def route(
    logits: Tensor,
    k: int,
    *,
    score: str = "softmax",
    bias: Tensor | None = None,
    normalize: bool = True,
    topk_before_softmax: bool = False,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> Routing:
    """Token-choice top-k routing of logits (T, E) -> Routing with K = k slots.

    ``bias`` (E,) is added to the scores for selection only (loss-free balancing, Wang et al.
    2024 eq. 3); weights gather the unbiased scores. Group-limited routing: DeepSeek-V3 §2.1.
    """
    _check_inputs(logits, k, score, bias)
    _check_groups(logits.shape[1], k, num_groups, topk_groups)
    logits_TE = logits.float()
    scores_TE = score_fn(logits_TE, score)  # (T, E)
    sel_TE = scores_TE.detach() if bias is None else scores_TE.detach() + bias.float()
    experts_TK = select_topk(sel_TE, k, num_groups=num_groups, topk_groups=topk_groups)
    weights_TK = gate_weights(
        logits_TE,
        scores_TE,
        experts_TK,
        normalize=normalize,
        topk_before_softmax=topk_before_softmax,
    )
    return Routing(logits_TE, scores_TE, weights_TK, experts_TK)


def soften(routing: Routing, alpha: float, *, normalize: bool) -> Routing:
    """Soft routing warm-up: dense mixture of all E experts, K' = E slots per token.

    weights_TE = alpha·p + (1 − alpha)·hard, where p are the scores (divided by their sum if
    ``normalize``) and hard the top-k weights scattered (0 for unselected experts). Slots are
    ordered by that weight (best first), so at alpha = 0 the first k slots are the hard routing.
    """
    scores_TE = routing.scores
    dense_TE = scores_TE / scores_TE.sum(-1, keepdim=True) if normalize else scores_TE
    hard_TE = torch.zeros_like(scores_TE).scatter(1, routing.experts, routing.weights)
    weights_TE = alpha * dense_TE + (1.0 - alpha) * hard_TE  # (T, E)
    experts_TE = weights_TE.detach().argsort(dim=-1, descending=True)
    return dataclasses.replace(
        routing, weights=weights_TE.gather(1, experts_TE), experts=experts_TE
    )


# ----------------------------------------------------------------------------- other methods


def _dense_routing(logits_TE: Tensor, scores_TE: Tensor, chosen_TE: Tensor) -> Routing:
    """Routing with K' = E slots: experts = arange(E), weights = score where chosen, else 0."""
    T, E = scores_TE.shape
    experts_TE = torch.arange(E, device=scores_TE.device).expand(T, E)
    weights_TE = scores_TE * chosen_TE
    return Routing(logits_TE, scores_TE, weights_TE, experts_TE, mask=chosen_TE)


def expert_choice_route(logits: Tensor, k: int, *, score: str = "softmax") -> Routing:
    """Expert choice (Zhou et al. 2022 eq. 1): each expert takes its C = ceil(T·k/E) best tokens.

    NON-CAUSAL in a decoder LM: whether token t is chosen depends on later tokens of the batch
    (future-token leakage). Returns K' = E slots; ``mask`` marks the chosen (token, expert)
    pairs; a token may get 0..E experts. Weights are the unnormalised scores (as in the paper).
    """
    _check_inputs(logits, k, score, None)
    logits_TE = logits.float()
    scores_TE = score_fn(logits_TE, score)  # (T, E)
    T, E = scores_TE.shape
    C = min(T, math.ceil(T * k / E))
    chosen_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
    chosen_TE.scatter_(0, scores_TE.detach().topk(C, dim=0).indices, True)  # (C, E) token ids
    return _dense_routing(logits_TE, scores_TE, chosen_TE)


@torch.no_grad()
def sinkhorn(logits_TE: Tensor, iters: int) -> Tensor:
    """Log of the balanced assignment (T, E): Sinkhorn on exp(logits) (Lewis et al. 2021 §3.1).

    Alternately normalises columns (each expert receives T/E of the mass) and rows (each token
    has mass 1), in log space for stability.
    """
    T, E = logits_TE.shape
    log_P = logits_TE.float()
    for _ in range(iters):  # a few iterations over (T, E), not a loop over tokens
        log_P = log_P - log_P.logsumexp(0, keepdim=True) + math.log(T / E)
        log_P = log_P - log_P.logsumexp(1, keepdim=True)
    return log_P


def sinkhorn_route(
    logits: Tensor,
    k: int,
    *,
    iters: int,
    score: str = "softmax",
    normalize: bool = True,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> Routing:
    """BASE-style balanced routing: top-k of the Sinkhorn-balanced matrix picks the experts.

    Weights come from the unbalanced scores so the router still learns (BASE layers use the
    router score of the assigned expert). ``bias`` does not apply: selection is balanced already.
    """
    _check_inputs(logits, k, score, None)
    _check_groups(logits.shape[1], k, num_groups, topk_groups)
    logits_TE = logits.float()
    scores_TE = score_fn(logits_TE, score)
    balanced_TE = sinkhorn(logits_TE.detach(), iters)
    experts_TK = select_topk(balanced_TE, k, num_groups=num_groups, topk_groups=topk_groups)
    weights_TK = gate_weights(logits_TE, scores_TE, experts_TK, normalize=normalize)
    return Routing(logits_TE, scores_TE, weights_TK, experts_TK)


def _hash_keys(token_ids_T: Tensor, E: int) -> Tensor:
    """Fixed pseudo-random keys (T, E) from (token id, expert): two LCG rounds mod 2^31."""
    x = (token_ids_T.long().unsqueeze(1) * E + torch.arange(E, device=token_ids_T.device)) % 2**31
    for _ in range(2):  # values stay < 2^31, so x·1103515245 fits in int64
        x = (x * 1103515245 + 12345) % 2**31
        x = x ^ (x >> 16)
    return x


def fixed_routing(logits: Tensor, experts_TK: Tensor, *, score: str = "softmax") -> Routing:
    """Routing with given experts (T, K) and weights 1/K; logits/scores kept for the aux metrics."""
    logits_TE = logits.float()
    weights_TK = torch.full(experts_TK.shape, 1.0 / experts_TK.shape[1], device=logits.device)
    return Routing(logits_TE, score_fn(logits_TE, score), weights_TK, experts_TK)


def hash_experts(token_ids: Tensor, k: int, num_experts: int) -> Tensor:
    """k distinct experts (T, K) per token from a fixed hash of its id (Roller et al. 2021)."""
    return _hash_keys(token_ids.reshape(-1), num_experts).topk(k, dim=-1).indices


def random_experts(num_tokens: int, k: int, num_experts: int, device=None) -> Tensor:
    """k distinct uniformly random experts (T, K) per token."""
    return torch.rand(num_tokens, num_experts, device=device).topk(k, dim=-1).indices


def uniform_experts(num_tokens: int, k: int, num_experts: int, device=None) -> Tensor:
    """Round-robin experts (T, K): token t gets (t·k + j) mod E; every expert gets T·k/E tokens."""
    slots_TK = torch.arange(num_tokens * k, device=device).view(num_tokens, k)
    return slots_TK % num_experts


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


class Router(nn.Module):
    """Linear fp32 gate x (T, D) -> logits (T, E) -> Routing, implementing every RouterConfig
    option (noise, annealing, expert masking, soft warm-up, all methods)."""

    def __init__(self, cfg: RouterConfig, d_model: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        _check_groups(num_experts, top_k, cfg.num_groups, cfg.topk_groups)
        self.cfg, self.num_experts, self.top_k = cfg, num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=torch.float32))
        if cfg.noise == "learned":  # Shazeer et al. 2017 eq. 4: W_noise, zero init
            self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight ~ N(0, init_std²) (zeros if init_std = 0); noise_weight zeros."""
        if self.cfg.init_std > 0:
            nn.init.normal_(self.weight, std=self.cfg.init_std)
        else:
            nn.init.zeros_(self.weight)
        if hasattr(self, "noise_weight"):
            nn.init.zeros_(self.noise_weight)

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

        The gate runs in fp32 with autocast off whatever the input dtype (Switch §2.4).
        ``bias`` (E,): loss-free selection bias (``topk`` only; the other methods balance by
        construction or ignore the scores). ``token_ids`` (T,): needed by ``hash``.
        """
        x_TD = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            x_TD = x_TD.float()
            method = self.cfg.method
            if method == "topk":
                return self._topk(x_TD, bias, step)
            logits_TE = F.linear(x_TD, self.weight)
            if method == "expert_choice":
                return expert_choice_route(logits_TE, self.top_k, score=self.cfg.score)
            if method == "sinkhorn":
                return self._sinkhorn(logits_TE)
            return self._fixed(logits_TE, token_ids)

    def _topk(self, x_TD: Tensor, bias: Tensor | None, step: int) -> Routing:
        """Token-choice top-k with the training-only noise, masking and soft warm-up."""
        cfg, train = self.cfg, self.training
        scale = anneal(step, cfg.noise_anneal_steps) if train else 0.0
        if cfg.noise == "jitter" and scale > 0:  # Switch: multiplicative input jitter
            eps = cfg.noise_std * scale
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = F.linear(x_TD, self.weight)
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
        std_TE = F.softplus(F.linear(x_TD, self.noise_weight)) * (self.cfg.noise_std * scale)
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
        """hash / random / uniform: experts independent of the logits, weights 1/k."""
        T, E, k, method = logits_TE.shape[0], self.num_experts, self.top_k, self.cfg.method
        _check_inputs(logits_TE, k, self.cfg.score, None)
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
        return fixed_routing(logits_TE, experts_TK, score=self.cfg.score)
