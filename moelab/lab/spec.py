"""Experiment specs (``moelab/lab/experiments/NAME.toml``) and the verdict rules they declare.

An experiment file holds the claim, the paper's numbers, a base preset, shared overrides
(``common``, ``quick``), a table of named variants (override lists), the analysis kind and
the verdict checks. Checks are written before any run, compare measured numbers, and decide
the verdict: all pass -> ``reproduced``; some pass -> ``partial``; none -> ``not_reproduced``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moelab.config import TopOneGateWarning, load_toml, type_hints
from moelab.lab import stats
from moelab.runconfig import RunConfig, build_config, load_config_dict

# The suite ships with the package (package data), so an installed moelab finds it too; any
# other experiment file is given by its path (``moelab lab run path/to/mine.toml``).
EXPERIMENTS = Path(__file__).resolve().parent / "experiments"
VERDICTS = ("reproduced", "partial", "not_reproduced", "inconclusive")
Analysis = Literal["balance", "chunks", "scope", "batch_size", "leakage", "fluctuation", "noise"]
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True)
class Check:
    """``lhs op factor·rhs + offset``; sides are metric paths like ``aux.maxvio_global``.

    ``rhs`` may be a number. A path names ``VARIANT.METRIC`` in the measured table or any dotted
    key of the analysis output; per-seed values (``values``, or an ``X_values`` sibling of an
    analysis number ``X``) give the check its noise model (``moelab.lab.stats``).

    ``kind``: ``key`` checks decide the verdict; ``sanity`` checks hold for any model by
    construction (a sampling law, a monotone knob, the quantity a loss minimises) and are shown,
    never counted. ``paper``: the paper's effect in the units of the margin (lhs − rhs), shown
    beside the MDE; a key check whose paper effect is below the MDE is "beyond resolution".
    ``paired``: compare per seed (arms that share initialisation and data order); None takes
    the experiment's ``paired`` setting. ``revised``: "DATE: reason" when the check was changed
    after results existed.
    """

    lhs: str
    op: str
    rhs: str | float
    factor: float = 1.0
    offset: float = 0.0
    why: str = ""
    kind: Literal["key", "sanity"] = "key"
    paper: float | None = None
    paired: bool | None = None
    revised: str = ""

    def evaluate(
        self,
        numbers: dict[str, Any],
        *,
        paired: bool = False,
        too_short: str = "",
        noise_mde: Callable[[Check, int], float | None] | None = None,
    ) -> dict[str, Any]:
        """Result row: both sides, the margin with its SE / 95 % CI / MDE / flip rate, and the
        outcome (``holds`` / ``fails`` / ``inconclusive``). ``too_short`` (a reason) makes a key
        check inconclusive; ``noise_mde(check, n)`` gives the noise experiment's MDE."""
        a = lookup(numbers, self.lhs)
        b = self.rhs if isinstance(self.rhs, (int, float)) else lookup(numbers, self.rhs)
        bound = None if b is None else self.factor * b + self.offset
        row: dict[str, Any] = {"check": self.text(), "kind": self.kind, "lhs": a, "bound": bound}
        row |= {"why": self.why, "paper": self.paper, "revised": self.revised}
        if a is None or bound is None:  # a number is missing: its runs were not trained
            return row | _undecided("a number is missing (variant not trained?)")
        row |= self._compare(numbers, b, self.paired if self.paired is not None else paired)
        if self.kind == "sanity":
            row["outcome"] = stats.plain_outcome(a - bound, self.op)
        else:
            row |= self._resolution(row, noise_mde, too_short)
        row["passed"] = row["outcome"] == "holds"
        return row

    def _compare(self, numbers: dict[str, Any], b: float, paired: bool) -> dict[str, Any]:
        a_S = lookup_values(numbers, self.lhs)
        b_S = None if isinstance(self.rhs, (int, float)) else lookup_values(numbers, self.rhs)
        if a_S is None or (b_S is None and not isinstance(self.rhs, (int, float))):
            return self._compare_summaries(numbers, b)
        kw = dict(op=self.op, factor=self.factor, offset=self.offset, paired=paired, b_const=b)
        cmp = stats.compare(a_S, b_S, **kw)
        return cmp.to_dict() | {"n": [len(a_S), len(b_S) if b_S is not None else None]}

    def _compare_summaries(self, numbers: dict[str, Any], b: float) -> dict[str, Any]:
        """Welch from (mean, sample SD, n) where per-seed values were not kept (results from
        before the noise model; no pairing, no flip rate); a side without an SD is constant."""
        a, b_sum = lookup_summary(numbers, self.lhs), None
        if not isinstance(self.rhs, (int, float)):
            b_sum = lookup_summary(numbers, self.rhs)
        kw = dict(op=self.op, factor=self.factor, offset=self.offset, b_const=b)
        if b_sum is not None and b_sum[1] is None:
            b_sum = None  # a number without spread: a constant bound
        cmp = stats.compare_summaries(a, b_sum, **kw)
        return cmp.to_dict() | {
            "n": [a[2], b_sum[2] if b_sum else None],
            "from_summaries": True,
        }

    def _resolution(self, row: dict[str, Any], noise_mde, too_short: str) -> dict[str, Any]:
        """Outcome of a key check: the 2-SE rule, then inconclusive when the runs are too short
        or, unless the bound is violated by >= 2 SE, when the paper's effect is below the MDE
        (``raw_outcome`` keeps the rule's answer). Since 2026-12-01 (see results/PREAMBLE.md)
        a violation beyond the noise stays "fails". Since 2026-12-02, before experiment 7's
        decisive runs: an exact tie with no spread (every seed of both arms equal, e.g. no dead
        expert anywhere) is inconclusive: the 2-SE rule would call ``<`` failed and ``<=``
        held, and neither says anything about the claim."""
        out = {"raw_outcome": row["outcome"], "mde_source": "own seeds"}
        n = min(x for x in row["n"] if x is not None)
        planned = noise_mde(self, n) if noise_mde else None
        if planned is not None:
            out |= {"mde": planned, "mde_own": row["mde"], "mde_source": "noise experiment"}
        mde = out.get("mde", row["mde"])
        if too_short:
            out |= {"outcome": "inconclusive", "note": f"too short: {too_short}"}
        elif row.get("se") == 0 and row.get("delta") == 0:  # e.g. 0 dead experts in both arms
            note = "an exact tie with no spread over seeds (a base rate of zero?): nothing to tell"
            out |= {"outcome": "inconclusive", "note": note}
        elif row["outcome"] == "fails":  # violated by >= 2 SE: a finding whatever the paper's Δ
            if self.paper is not None and mde is not None and abs(self.paper) < mde:
                out["note"] = (
                    f"fails beyond the noise; the paper's Δ {self.paper:.3g} is below the MDE "
                    f"{mde:.3g}"
                )
        elif self.paper is not None and mde is not None and abs(self.paper) < mde:
            note = f"beyond resolution: paper Δ {self.paper:.3g}, MDE {mde:.3g}"
            out |= {"outcome": "inconclusive", "note": note}
        elif n < 2:
            out["note"] = "one seed never decides a key check"
        return out

    def text(self) -> str:
        rhs = f"{self.factor:g}×{self.rhs}" if self.factor != 1 else str(self.rhs)
        return f"{self.lhs} {self.op} {rhs}" + (f" + {self.offset:g}" if self.offset else "")


def _undecided(note: str) -> dict[str, Any]:
    """A row without its numbers: inconclusive, every statistic None (the same keys)."""
    stats_ = dict.fromkeys(("delta", "se", "df", "ci95", "mde", "flip_rate"))
    return stats_ | {"outcome": "inconclusive", "passed": False, "undecided": True, "note": note}


@dataclass(frozen=True)
class Decisive:
    """The run size at which the experiment's claim can show (``[decisive]`` table).

    ``overrides`` are added to every run at that size (``lab run --decisive``), ``variants``
    adds per-variant overrides (e.g. steps for an equal token budget); ``seeds`` is its
    default seed count; ``why`` says what sets the size. Verdicts come only from runs at least
    this long (steps and training tokens of the decisive config); shorter runs report
    ``inconclusive`` (too short).
    """

    overrides: list[str]
    seeds: int = 3
    why: str = ""
    variants: dict[str, list[str]] = field(default_factory=dict)  # per-variant extras


@dataclass(frozen=True)
class Experiment:
    """One experiment file, parsed; ``variants`` maps a name to its override list."""

    name: str
    number: str
    title: str
    claim: str
    paper: dict[str, Any]
    base: str
    analysis: Analysis
    variants: dict[str, list[str]]
    common: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    quick_variants: list[str] = field(default_factory=list)
    seeds: int = 1
    checks: list[Check] = field(default_factory=list)
    decisive: Decisive | None = None
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def overrides(
        self, variant: str, *, quick: bool, seed: int, decisive: bool = False
    ) -> list[str]:
        """The override list of one run: common, variant, quick shrink or decisive size, seed."""
        if quick and decisive:
            raise ValueError("--quick and --decisive exclude each other")
        if decisive and self.decisive is None:
            raise ValueError(f"{self.name}: the experiment declares no [decisive] size")
        extra = self.quick if quick else []
        if decisive:
            extra = [*self.decisive.overrides, *self.decisive.variants.get(variant, [])]
        return [*self.common, *self.variants[variant], *extra, f"train.seed={seed}"]

    def run_config(
        self, variant: str, *, quick: bool = False, seed: int = 0, decisive: bool = False
    ) -> RunConfig:
        return build_arm_config(
            load_config_dict(self.base),
            self.overrides(variant, quick=quick, seed=seed, decisive=decisive),
        )

    def nproc(self, variant: str) -> int:
        """Processes the variant trains with (``[nproc]`` table; > 1 means torchrun)."""
        return int(self.options.get("nproc", {}).get(variant, 1))

    def variant_names(self, quick: bool) -> list[str]:
        return list(self.quick_variants or self.variants) if quick else list(self.variants)


def build_arm_config(d: dict, overrides: list[str] | None = None) -> RunConfig:
    """:func:`build_config` for a lab arm. An arm at k = 1 with renormalised gates is
    deliberate (experiment 7b tests it), so :class:`TopOneGateWarning` is silenced while the
    lab builds, lists or analyses runs (its single-process runs train in-process, so they do
    not print it either); ``moelab train`` on a user's config still warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TopOneGateWarning)
        return build_config(d, overrides or [])


def load_experiment(name_or_path: str | Path) -> Experiment:
    """Parse the suite's ``NAME.toml`` (:data:`EXPERIMENTS`) or a file path into an
    :class:`Experiment`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = EXPERIMENTS / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(
            f"no experiment {str(name_or_path)!r}; allowed: a path to a .toml file or one of "
            f"{experiment_names()}"
        )
    d = load_toml(path)
    raw_checks = d.pop("checks", [])
    if not isinstance(raw_checks, list):
        raise ValueError(f"{path.name}: checks must be [[checks]] tables, got {raw_checks!r}")
    checks = [_table(Check, c, f"{path.name}: checks[{i}]") for i, c in enumerate(raw_checks)]
    decisive = (
        _table(Decisive, d.pop("decisive"), f"{path.name}: decisive") if "decisive" in d else None
    )
    for c in checks:
        if c.op not in _OPS:
            raise ValueError(f"{path.name}: check op {c.op!r} not in {sorted(_OPS)}")
        if c.kind not in ("key", "sanity"):
            raise ValueError(f"{path.name}: check kind {c.kind!r} not in ['key', 'sanity']")
    fixed = ("checks", "path", "options", "decisive")
    known = {f for f in Experiment.__dataclass_fields__ if f not in fixed}
    opts = {k: d.pop(k) for k in list(d) if k not in known}
    d.setdefault("name", path.stem)
    required = ["number", "title", "claim", "paper", "base", "analysis", "variants"]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{path.name}: missing {missing} (an experiment needs {required})")
    _check_types(Experiment, d, path.name)
    exp = Experiment(**d, checks=checks, decisive=decisive, options=opts, path=path)
    unknown = [v for v in exp.quick_variants if v not in exp.variants]
    if unknown:
        raise ValueError(f"{path.name}: quick_variants {unknown} are not variants")
    nproc = exp.options.get("nproc", {})
    bad = {
        v: n for v, n in nproc.items() if v not in exp.variants or not isinstance(n, int) or n < 1
    }
    if bad:
        raise ValueError(f"{path.name}: [nproc] needs variant = integer >= 1, got {bad}")
    return exp


def _table(cls: type, data: Any, where: str) -> Any:
    """``cls(**data)`` for a TOML table, every key checked: an unknown or missing key, or a
    value of the wrong type, is one ``ValueError`` naming ``where`` and the key."""
    fields = dataclasses.fields(cls)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a table of settings, got {data!r}")
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r}; valid keys: {[f.name for f in fields]}"
        )
    required = [f.name for f in fields if f.default is f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    _check_types(cls, data, where)
    return cls(**data)


def _check_types(cls: type, data: dict[str, Any], where: str) -> None:
    """Every value of ``data`` of the type its field of ``cls`` declares, else one
    ``ValueError`` naming ``where``, the key and the expected type."""
    hints = type_hints(cls)
    for key, value in data.items():
        if not _fits(hints[key], value):
            raise ValueError(
                f"{where}: {key}={value!r} is not allowed; expected {_name(hints[key])}"
            )


def _name(hint: Any) -> str:
    """A type as a reader writes it: ``float``, ``str | float``, ``list[str]``."""
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)


def _fits(hint: Any, value: Any) -> bool:
    """Whether ``value`` (from TOML) has type ``hint``: scalars, unions, lists, dicts."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_fits(args[0], v) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(args[1], v) for v in value.values())
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.toml"))


def lookup(numbers: dict[str, Any], path: str) -> float | None:
    """A dotted path into nested dicts; keys may contain dots themselves (``cf1.0_score``).

    Returns None if absent or not a finite number; ``{"mean": ...}`` nodes give their mean.
    """
    node = _walk(numbers, path.split("."))
    if isinstance(node, dict) and "mean" in node:
        node = node["mean"]
    ok = isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node)
    return float(node) if ok else None


def contrast_values(numbers: dict[str, Any], weights: dict[str, float]) -> list[float] | None:
    """Per-seed values of Σ_p w_p·value_p(seed) over metric paths (an interaction or any linear
    contrast of arms, e.g. (a − b) − (c − d)); None unless every path has values for the same
    number of seeds."""
    cols = [lookup_values(numbers, path) for path in weights]
    if any(c is None for c in cols) or len({len(c) for c in cols}) != 1:
        return None
    pairs = list(zip(weights.values(), cols, strict=True))
    return [sum(w * c[s] for w, c in pairs) for s in range(len(cols[0]))]


def lookup_values(numbers: dict[str, Any], path: str) -> list[float] | None:
    """Per-seed values behind a path: a node's ``values``, or the analysis sibling ``X_values``
    of ``X``; None when there are none."""
    node = _walk(numbers, path.split("."))
    vals = node.get("values") if isinstance(node, dict) else None
    if vals is None and not isinstance(node, dict):
        vals = _walk(numbers, [*path.split(".")[:-1], path.split(".")[-1] + "_values"])
    if not isinstance(vals, list) or not vals:
        return None
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals)
    return [float(v) for v in vals] if ok else None


def lookup_summary(numbers: dict[str, Any], path: str) -> tuple[float, float | None, int]:
    """(mean, sample SD or None, n) of a path: from ``values`` when kept, else from the node's
    ``std`` (``std_ddof`` 0 is converted to the sample SD) or an analysis ``X_std`` sibling."""
    vals = lookup_values(numbers, path)
    if vals is not None:
        s = stats.summarize(vals)
        return s["mean"], s["std"], s["n"]
    mean = lookup(numbers, path)
    node = _walk(numbers, path.split("."))
    if isinstance(node, dict):
        std, n = node.get("std"), int(node.get("n", 1))
        if std is not None and node.get("std_ddof", 1) == 0 and n > 1:
            std = std * math.sqrt(n / (n - 1))
    else:
        parts = path.split(".")
        std = _walk(numbers, [*parts[:-1], parts[-1] + "_std"])
        n = _walk(numbers, [*parts[:-2], "seeds"]) if len(parts) > 1 else None
        n = n if isinstance(n, int) else 1
        if isinstance(std, (int, float)) and n > 1:
            std = std * math.sqrt(n / (n - 1))  # the analyses' spreads were population SDs
        else:
            std = None
    return float(mean), (float(std) if isinstance(std, (int, float)) and n > 1 else None), n


def _walk(node: Any, parts: list[str]) -> Any:
    if not parts:
        return node
    if not isinstance(node, dict):
        return None
    for n in range(1, len(parts) + 1):  # shortest key first, then keys with dots
        key = ".".join(parts[:n])
        if key in node:
            found = _walk(node[key], parts[n:])
            if found is not None:
                return found
    return None


def decide(
    checks: list[Check],
    numbers: dict[str, Any],
    *,
    paired: bool = False,
    too_short: str = "",
    noise_mde: Callable[[Check, int], float | None] | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Apply the checks; the verdict reads the key checks only: all hold -> ``reproduced``;
    at least one holds and one fails or is inconclusive -> ``partial``; at least one fails and
    none holds -> ``not_reproduced``; none decided -> ``inconclusive``."""
    kw = dict(paired=paired, too_short=too_short, noise_mde=noise_mde)
    rows = [c.evaluate(numbers, **kw) for c in checks]
    return verdict([r["outcome"] for r in rows if r["kind"] == "key"]), rows


def verdict(outcomes: list[str]) -> str:
    """The verdict over the key checks' outcomes (see :func:`decide`)."""
    holds, fails = outcomes.count("holds"), outcomes.count("fails")
    if holds and holds == len(outcomes):
        return "reproduced"
    if holds:
        return "partial"
    return "not_reproduced" if fails else "inconclusive"
