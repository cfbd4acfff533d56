"""The lab's noise model: per-seed summaries, two-arm differences, decisions and resolution.

A check ``lhs op factor·rhs + offset`` is judged on its *margin* d = lhs − (factor·rhs + offset)
(negative means "lhs is below the bound"). With per-seed values on both sides:

- paired by seed (arms that share initialisation and data order): d_s per seed,
  se = sd(d_s)/√n, df = n − 1;
- otherwise Welch: se = √(s_a²/n_a + factor²·s_b²/n_b), Welch–Satterthwaite df.

Outcome (issue 15 §1): **holds** when the bound holds by at least two standard errors
(d ≤ −2·se for ``<``/``<=``, d ≥ 2·se for ``>``/``>=``), **fails** when it is violated by at
least two, **inconclusive** otherwise, and whenever a side has fewer than two seeds (no SE).
The 95 % CI is d ± t(0.975, df)·se (wider than ±2·se at few seeds); the minimum detectable effect
(MDE) is the true margin the 2-SE rule detects with 80 % power: (2 + z(0.8))·se ≈ 2.84·se. A
bootstrap over seeds gives the flip rate: the share of resamples whose outcome differs.

Legend: S seeds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

Z_SE = 2.0  # decision margin in standard errors (issue 15)
POWER_Z = float(sps.norm.ppf(0.8))  # 0.8416: 80 % power
MDE_SE = Z_SE + POWER_Z  # MDE in standard errors
OUTCOMES = ("holds", "fails", "inconclusive")


def summarize(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std" (sample, ddof=1; None for one value), "n", "values"}`` of per-seed values
    in seed order."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else None
    return {"mean": float(arr.mean()), "std": std, "n": len(arr), "values": arr.tolist()}


@dataclass(frozen=True)
class Comparison:
    """A check's margin d = lhs − bound with its noise: ``delta`` (mean margin), ``se``,
    ``df``, ``ci95`` ([lo, hi]), ``mde`` (2.84·se), the ``outcome`` and its bootstrap
    ``flip_rate`` (None without per-seed values on both sides)."""

    delta: float
    se: float | None
    df: float | None
    ci95: list[float] | None
    mde: float | None
    outcome: str
    paired: bool
    flip_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def margin_stats(
    a_S: np.ndarray,
    b_S: np.ndarray | None,
    *,
    factor: float = 1.0,
    offset: float = 0.0,
    paired: bool = False,
    b_const: float | None = None,
) -> tuple[float, float | None, float | None]:
    """(mean margin, se, df) of d = a − (factor·b + offset).

    ``b_S`` None means the right-hand side is the constant ``b_const`` (a number, or an analysis
    value without per-seed values); then d_s = a_s − (factor·b_const + offset)."""
    if b_S is None:
        d_S = a_S - (factor * float(b_const) + offset)
        return _one_sample(d_S)
    if paired and len(a_S) == len(b_S):
        return _one_sample(a_S - factor * b_S - offset)
    delta = float(a_S.mean() - factor * b_S.mean() - offset)
    if len(a_S) < 2 or len(b_S) < 2:
        return delta, None, None
    a_sum = (float(a_S.std(ddof=1)), len(a_S))
    return (delta, *_welch(a_sum, (float(b_S.std(ddof=1)), len(b_S)), factor))


def _welch(a: tuple[float, int], b: tuple[float, int], factor: float) -> tuple[float, float]:
    """(se, Welch–Satterthwaite df) of mean(a) − factor·mean(b) from (sample SD, n) pairs."""
    (sa, na), (sb, nb) = a, b
    va, vb = sa**2 / na, factor**2 * sb**2 / nb
    den = (va**2 / (na - 1) if va else 0.0) + (vb**2 / (nb - 1) if vb else 0.0)
    df = (va + vb) ** 2 / den if den > 0 else float(na + nb - 2)
    return math.sqrt(va + vb), df


def _one_sample(d_S: np.ndarray) -> tuple[float, float | None, float | None]:
    if len(d_S) < 2:
        return float(d_S.mean()), None, None
    return float(d_S.mean()), float(d_S.std(ddof=1) / math.sqrt(len(d_S))), float(len(d_S) - 1)


def outcome(delta: float, se: float | None, op: str) -> str:
    """holds / fails / inconclusive of a margin under ``op`` by the 2-SE rule (no SE:
    inconclusive)."""
    if se is None or not math.isfinite(delta):
        return "inconclusive"
    below = op in ("<", "<=")
    signed = -delta if below else delta  # > 0: the bound holds
    if signed >= Z_SE * se and (signed > 0 or op in ("<=", ">=")):
        return "holds"
    if -signed >= Z_SE * se and (signed < 0 or op in ("<", ">")):
        return "fails"
    return "inconclusive"


def plain_outcome(delta: float, op: str) -> str:
    """A sanity check's outcome: the bound read on the means, no noise model."""
    ok = {"<": delta < 0, "<=": delta <= 0, ">": delta > 0, ">=": delta >= 0}[op]
    return "holds" if ok else "fails"


def compare(
    a_S: list[float],
    b_S: list[float] | None,
    *,
    op: str,
    factor: float = 1.0,
    offset: float = 0.0,
    paired: bool = False,
    b_const: float | None = None,
) -> Comparison:
    """The :class:`Comparison` of per-seed values ``a_S`` against ``b_S`` (or a constant)."""
    a = np.asarray(a_S, dtype=np.float64)
    b = None if b_S is None else np.asarray(b_S, dtype=np.float64)
    is_paired = bool(paired and b is not None and len(a) == len(b))
    kw = dict(factor=factor, offset=offset, b_const=b_const)
    delta, se, df = margin_stats(a, b, paired=is_paired, **kw)
    cmp = _comparison(delta, se, df, op, is_paired)
    return dataclasses.replace(cmp, flip_rate=_flip_rate(a, b, op, is_paired, kw))


def _comparison(delta: float, se: float | None, df: float | None, op: str, paired: bool):
    """The Comparison of a margin: 95 % CI from the t quantile, MDE, 2-SE outcome."""
    ci = None
    if se is not None and df is not None:
        half = float(sps.t.ppf(0.975, df)) * se
        ci = [delta - half, delta + half]
    mde = None if se is None else MDE_SE * se
    return Comparison(delta, se, df, ci, mde, outcome(delta, se, op), paired)


def compare_summaries(
    a: tuple[float, float | None, int],
    b: tuple[float, float | None, int] | None,
    *,
    op: str,
    factor: float = 1.0,
    offset: float = 0.0,
    b_const: float | None = None,
) -> Comparison:
    """Welch :class:`Comparison` from ``(mean, sample SD, n)`` summaries (``b`` None: the
    constant ``b_const``); no SD on the lhs means no SE (inconclusive)."""
    (ma, sa, na) = a
    if b is None:
        delta = ma - (factor * float(b_const) + offset)
        se = None if sa is None else sa / math.sqrt(na)
        df = None if sa is None else float(na - 1)
    else:
        (mb, sb, nb) = b
        delta = ma - factor * mb - offset
        se, df = (None, None) if sa is None or sb is None else _welch((sa, na), (sb, nb), factor)
    return _comparison(delta, se, df, op, False)


def _flip_rate(
    a: np.ndarray, b: np.ndarray | None, op: str, paired: bool, kw: dict, resamples: int = 2000
) -> float | None:
    """Share of bootstrap resamples over seeds (paired: the pairs jointly; else each arm on its
    own) whose outcome differs from the observed one; None with fewer than two seeds."""
    if len(a) < 2 or (b is not None and len(b) < 2):
        return None
    observed = outcome(*margin_stats(a, b, paired=paired, **kw)[:2], op)
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(resamples):
        ia = rng.integers(0, len(a), len(a))
        b2 = None if b is None else b[ia if paired else rng.integers(0, len(b), len(b))]
        delta, se, _ = margin_stats(a[ia], b2, paired=paired, **kw)
        flips += outcome(delta, se, op) != observed
    return flips / resamples


def mde_from_sd(sd: float, n: int, *, factor: float = 1.0) -> float:
    """MDE of a two-arm margin at ``n`` seeds per arm when each arm's seed SD is ``sd`` (the
    noise experiment's): 2.84·sd·√((1 + factor²)/n), arms taken as independent (pairing can
    only remove shared noise, so this is the resolution without it)."""
    return MDE_SE * sd * math.sqrt((1 + factor**2) / n)
