"""Default MoE: moving-average expert outputs stand in for the unselected experts.

Panda et al. 2025, "Dense Backpropagation Improves Training for Sparse Mixture-of-Experts"
(arXiv 2504.12463): top-k routing gives the router gradient only through the k chosen experts
(seed 000/004). Each expert keeps a default output ê_i, an exponential moving average of its
outputs on the tokens routed to it, and every unselected expert's gate probability p_ti gets the
gradient it would get if expert i had answered ê_i. moelab adds the term straight-through:
Σ_{i ∉ A_t} p_ti·ê_i − (the same, detached), zero in value, so the forward output is the
sparse layer's (the "forward-sparse, backward-dense" reading; the paper's code was not at hand
to check whether it also adds the defaults to the forward value).

Legend: T tokens, K slots, E experts, D model dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.experts import Experts, swiglu

SAMPLE = 32  # routed tokens per expert per training forward that feed its moving average


@torch.no_grad()
def sample_expert_means(
    experts: Experts, x_TD: Tensor, experts_TK: Tensor, mask_TK: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Each expert's mean output (E, D) over its first :data:`SAMPLE` routed tokens (in token
    order), recomputed without grad or dropout, and (E,) bool: which experts had a token."""
    E, T, K = experts.num_experts, *experts_TK.shape
    ids_S = experts_TK.reshape(-1)
    tok_S = torch.arange(T, device=x_TD.device).repeat_interleave(K)
    if mask_TK is not None:
        keep = mask_TK.reshape(-1)
        ids_S, tok_S = ids_S[keep], tok_S[keep]
    order = ids_S.argsort(stable=True)
    ids_S, tok_S = ids_S[order], tok_S[order]
    n_E = torch.bincount(ids_S, minlength=E)
    rank_S = torch.arange(ids_S.numel(), device=x_TD.device) - (n_E.cumsum(0) - n_E)[ids_S]
    first = rank_S < SAMPLE
    ids_S, tok_S = ids_S[first], tok_S[first]
    x_SD = x_TD.detach()[tok_S]
    y_SD = torch.cat(
        [
            swiglu(x_SD[ids_S == e], experts.w13_ED2F[e].to(x_SD), experts.w2_EFD[e].to(x_SD))
            for e in range(E)
        ]
    )  # per-expert blocks in expert order, as ids_S is sorted
    used_E = torch.bincount(ids_S, minlength=E)
    sums_ED = torch.zeros(E, x_TD.shape[1], dtype=y_SD.dtype, device=x_TD.device)
    sums_ED.index_add_(0, ids_S, y_SD)
    return sums_ED / used_E.clamp_min(1).unsqueeze(1), used_E > 0


def dense_term(
    scores_TE: Tensor, experts_TK: Tensor, mask_TK: Tensor | None, defaults_ED: Tensor
) -> Tensor:
    """(T, D), zero in value: Σ_{i ∉ A_t} p_ti·ê_i minus its detached copy, so the gradient to
    each unselected expert's score is ⟨∂L/∂y_t, ê_i⟩ (ê detached: no gradient to the experts)."""
    chosen_TE = torch.zeros_like(scores_TE, dtype=torch.int64)
    valid_TK = torch.ones_like(experts_TK, dtype=torch.int64) if mask_TK is None else mask_TK.long()
    chosen_TE = chosen_TE.scatter_reduce(1, experts_TK, valid_TK, reduce="amax")
    default_TD = (scores_TE * (chosen_TE == 0)) @ defaults_ED.to(scores_TE.dtype)
    return default_TD - default_TD.detach()
