"""The lab's noise model (moelab/lab/stats.py) against scipy's t-tests and by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from moelab.lab import stats

A = [5.91, 5.98, 6.02, 5.95]
B = [6.10, 6.01, 6.21, 6.15]


def test_welch_se_and_df_equal_scipy():
    """Unpaired: delta/se is scipy's Welch t statistic and df its Welch–Satterthwaite df."""
    cmp = stats.compare(A, B, op="<")
    ref = sps.ttest_ind(A, B, equal_var=False)
    assert cmp.delta / cmp.se == pytest.approx(ref.statistic, rel=1e-12)
    assert cmp.df == pytest.approx(ref.df, rel=1e-12)
    half = sps.t.ppf(0.975, ref.df) * cmp.se
    assert cmp.ci95 == pytest.approx([cmp.delta - half, cmp.delta + half])


def test_paired_se_equals_scipy_ttest_rel():
    """Paired by seed: delta/se is scipy's paired t statistic, df = n − 1."""
    cmp = stats.compare(A, B, op="<", paired=True)
    ref = sps.ttest_rel(A, B)
    assert cmp.paired and cmp.delta / cmp.se == pytest.approx(ref.statistic, rel=1e-12)
    assert cmp.df == len(A) - 1


def test_factor_offset_and_constant_rhs():
    """The margin is lhs − (factor·rhs + offset); a numeric rhs is a one-sample test."""
    cmp = stats.compare(A, B, op="<", factor=0.5, offset=0.1)
    assert cmp.delta == pytest.approx(np.mean(A) - 0.5 * np.mean(B) - 0.1)
    one = stats.compare(A, None, op=">", b_const=5.0)
    ref = sps.ttest_1samp(A, 5.0)
    assert one.delta / one.se == pytest.approx(ref.statistic, rel=1e-12)


@pytest.mark.parametrize(
    "delta,se,op,want",
    [
        (-0.3, 0.1, "<", "holds"),  # 3 SE below the bound
        (-0.19, 0.1, "<", "inconclusive"),  # 1.9 SE
        (0.25, 0.1, "<", "fails"),
        (0.25, 0.1, ">", "holds"),
        (-0.25, 0.1, ">=", "fails"),
        (0.0, 0.0, "<=", "holds"),  # an exact tie satisfies <=
        (0.0, 0.0, "<", "fails"),  # ... and violates <
        (-0.3, None, "<", "inconclusive"),  # no SE (one seed): never decided
    ],
)
def test_two_standard_error_rule(delta, se, op, want):
    assert stats.outcome(delta, se, op) == want


def test_mde_is_the_effect_the_rule_detects_with_80_percent_power():
    """MDE = (2 + z_0.8)·se; a true margin of one MDE with a known se is detected 80 % of the
    time by the 2-SE rule (normal sampling of the estimate)."""
    assert stats.MDE_SE == pytest.approx(2.8416, abs=1e-4)
    rng = np.random.default_rng(0)
    se = 0.05
    est = rng.normal(-stats.MDE_SE * se, se, 200_000)
    assert np.mean([e <= -2 * se for e in est]) == pytest.approx(0.8, abs=0.005)
    assert stats.mde_from_sd(0.07, 3) == pytest.approx(2.8416 * 0.07 * (2 / 3) ** 0.5, rel=1e-4)


def test_flip_rate():
    """Arms far apart never flip under resampling; arms that overlap often do; one seed has
    no flip rate."""
    far = stats.compare([1.0, 1.1, 0.9], [5.0, 5.1, 4.9], op="<").flip_rate
    assert far == 0.0
    near = stats.compare(A, [6.0, 5.9, 6.05, 5.97], op="<").flip_rate
    assert 0.05 < near < 0.95
    assert stats.compare([1.0], [2.0, 3.0], op="<").flip_rate is None


def test_summarize_keeps_values_and_sample_sd():
    s = stats.summarize([1.0, 2.0, 4.0])
    assert s["values"] == [1.0, 2.0, 4.0] and s["n"] == 3
    assert s["std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert stats.summarize([3.0])["std"] is None
