"""Selection rules as data (moelab.hf.rules): select against plain references, inference.

Shape legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moelab.hf import rules as R
from moelab.hf.families import FAMILIES

T, E, K = 64, 8, 2


class Router(nn.Module):
    """A fake router holding the attributes rules read (norm flag, groups, scaling)."""

    def __init__(self, norm: bool = True, groups: int = 1) -> None:
        super().__init__()
        self.norm_topk_prob = norm
        self.num_group, self.topk_group = groups, 1
        self.routed_scaling_factor = 2.5


def logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed))


def test_softmax_rule_is_topk_of_softmax_renormalised():
    """Mixtral's rule equals softmax → top-k → weights / their sum."""
    x_TE = logits()
    w_TK, e_TK = R.select(R.Rule("softmax"), x_TE, Router(), top_k=K)
    ref_w, ref_e = torch.topk(x_TE.softmax(-1), K, dim=-1)
    assert torch.equal(e_TK, ref_e)
    torch.testing.assert_close(w_TK, ref_w / ref_w.sum(-1, keepdim=True))


def test_topk_before_softmax_equals_softmax_over_the_k_logits():
    """Granite / GPT-OSS: top-k of the raw logits, softmax over the k chosen."""
    x_TE = logits(1)
    rule = R.Rule("softmax", order="topk_score", normalize=False)
    w_TK, e_TK = R.select(rule, x_TE, Router(), top_k=K)
    top_TK, idx_TK = x_TE.topk(K, dim=-1)
    assert torch.equal(e_TK, idx_TK)
    assert torch.equal(w_TK, top_TK.softmax(-1))


def test_bias_changes_the_choice_not_the_weights():
    """A selection bias picks expert 3 for every token; its weight is its unbiased score."""
    x_TE = logits(2)
    bias_E = torch.zeros(E)
    bias_E[3] = 100.0
    w_TK, e_TK = R.select(R.Rule("sigmoid", normalize=False), x_TE, Router(), bias_E=bias_E,
                          top_k=K)  # fmt: skip
    assert (e_TK == 3).any(-1).all()
    assert torch.equal(w_TK, x_TE.sigmoid().gather(1, e_TK))


def test_infer_rule_finds_the_rule_that_made_an_output_and_none_for_noise():
    """The rule that produced (weights, experts) is found among the candidates; halved weights
    match no candidate."""
    router = Router(norm=False)
    x_TE = logits(3)
    truth = R.Rule("sigmoid", normalize="norm_topk_prob", scale="routed_scaling_factor")
    w_TK, e_TK = R.select(truth, x_TE, router, top_k=K)
    found = R.infer_rule(router, x_TE, w_TK, e_TK)
    assert found is not None
    assert R.matches(found, logits(4), router, *R.select(truth, logits(4), router, top_k=K), None)
    assert R.infer_rule(router, x_TE, w_TK * 0.5, e_TK) is None


@pytest.mark.parametrize("fam", [f for f in FAMILIES if f.rule is not None], ids=lambda f: f.name)
def test_every_registry_rule_describes_itself(fam):
    """Every registry rule has a one-line description for the docs table."""
    text = fam.rule.describe()
    assert text and "\n" not in text
