"""moelab.lab.fingerprint: when two numerics fingerprints count as the same numbers."""

from __future__ import annotations

from moelab.lab import fingerprint as F

LOSSES = [6.2178607, 5.9956145, 5.6514106]
COUNTS = [[1398, 470, 1676, 552], [2021, 1869, 0, 206]]  # 8,192 assignments


def _fp(losses, counts, cpu):
    rec = F.make(losses, counts)
    return dict(rec, platform=dict(rec["platform"], cpu=cpu))


def test_one_platform_needs_equal_digests():
    a = _fp(LOSSES, COUNTS, "A")
    assert F.matches(a, _fp(LOSSES, COUNTS, "A"))
    assert not F.matches(a, _fp([LOSSES[0] * (1 + 1e-7), *LOSSES[1:]], COUNTS, "A"))
    assert not F.matches(a, None) and not F.matches(None, a)


def test_across_platforms_last_bit_losses_and_a_near_tie_flip_match():
    """An Intel Xeon and an AMD EPYC differ by 2e-6 in a loss and one moved assignment."""
    moved = [[1398, 470, 1676, 552], [2021, 1868, 1, 206]]
    b = _fp([x * (1 + 2e-6) for x in LOSSES], moved, "B")
    assert F.moved_share(moved, COUNTS) == 1 / 8192
    assert F.matches(_fp(LOSSES, COUNTS, "A"), b)


def test_across_platforms_a_changed_formula_does_not_match():
    a = _fp(LOSSES, COUNTS, "A")
    assert not F.matches(a, _fp([x * (1 + 1e-4) for x in LOSSES], COUNTS, "B"))  # losses
    shifted = [[1398, 470, 1676, 552], [2000, 1890, 0, 206]]  # 21 of 8,192 moved: 0.26 %
    assert not F.matches(a, _fp(LOSSES, shifted, "B"))
    assert not F.matches(a, _fp(LOSSES, [COUNTS[0]], "B"))  # other shape
    assert not F.matches(a, _fp(LOSSES[:2], COUNTS, "B"))
