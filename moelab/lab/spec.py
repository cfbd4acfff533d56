"""Experiment specs (``experiments/NAME.toml``) and the verdict rules they declare.

An experiment file holds the claim, the paper's numbers, a base preset, shared overrides
(``common``, ``quick``), a table of named variants (override lists), the analysis kind and
the verdict checks. Checks are written before any run, compare measured numbers, and decide
the verdict: all pass -> ``reproduced``; some pass -> ``partial``; none -> ``not_reproduced``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moelab.config import load_toml
from moelab.train import RunConfig, build_config, load_config_dict

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
VERDICTS = ("reproduced", "partial", "not_reproduced")
Analysis = Literal["balance", "chunks", "scope", "batch_size", "leakage", "fluctuation"]
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True)
class Check:
    """``lhs op factor·rhs + offset``; sides are metric paths like ``aux.maxvio_global``.

    ``rhs`` may be a number. A path names ``VARIANT.METRIC`` in the measured table (means over
    seeds) or any dotted key of the analysis output.
    """

    lhs: str
    op: str
    rhs: str | float
    factor: float = 1.0
    offset: float = 0.0
    why: str = ""

    def evaluate(self, numbers: dict[str, Any]) -> dict[str, Any]:
        """Result row: the values on both sides and whether the check passed."""
        a = lookup(numbers, self.lhs)
        b = self.rhs if isinstance(self.rhs, (int, float)) else lookup(numbers, self.rhs)
        bound = None if b is None else self.factor * b + self.offset
        ok = a is not None and bound is not None and _OPS[self.op](a, bound)
        row = {"check": self.text(), "lhs": a, "bound": bound, "passed": bool(ok), "why": self.why}
        if a is None or bound is None:
            row["undecided"] = True  # a number is missing: counted as not passed
        return row

    def text(self) -> str:
        rhs = f"{self.factor:g}×{self.rhs}" if self.factor != 1 else str(self.rhs)
        return f"{self.lhs} {self.op} {rhs}" + (f" + {self.offset:g}" if self.offset else "")


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
    options: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def overrides(self, variant: str, *, quick: bool, seed: int) -> list[str]:
        """The override list of one run: common, variant, quick shrink, seed."""
        extra = self.quick if quick else []
        return [*self.common, *self.variants[variant], *extra, f"train.seed={seed}"]

    def run_config(self, variant: str, *, quick: bool = False, seed: int = 0) -> RunConfig:
        return build_config(
            load_config_dict(self.base), self.overrides(variant, quick=quick, seed=seed)
        )

    def nproc(self, variant: str) -> int:
        """Processes the variant trains with (``[nproc]`` table; > 1 means torchrun)."""
        return int(self.options.get("nproc", {}).get(variant, 1))

    def variant_names(self, quick: bool) -> list[str]:
        return list(self.quick_variants or self.variants) if quick else list(self.variants)


def load_experiment(name_or_path: str | Path) -> Experiment:
    """Parse ``experiments/NAME.toml`` (or a path) into an :class:`Experiment`."""
    path = Path(name_or_path)
    if not path.suffix:
        path = EXPERIMENTS / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(f"no experiment {str(name_or_path)!r}; available: {experiment_names()}")
    d = load_toml(path)
    checks = [Check(**c) for c in d.pop("checks", [])]
    for c in checks:
        if c.op not in _OPS:
            raise ValueError(f"{path.name}: check op {c.op!r} not in {sorted(_OPS)}")
    known = {f for f in Experiment.__dataclass_fields__ if f not in ("checks", "path", "options")}
    opts = {k: d.pop(k) for k in list(d) if k not in known}
    d.setdefault("name", path.stem)
    required = ["number", "title", "claim", "paper", "base", "analysis", "variants"]
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"{path.name}: missing {missing} (an experiment needs {required})")
    exp = Experiment(**d, checks=checks, options=opts, path=path)
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


def decide(checks: list[Check], numbers: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Apply the checks: all pass -> reproduced, some -> partial, none -> not_reproduced."""
    rows = [c.evaluate(numbers) for c in checks]
    passed = sum(r["passed"] for r in rows)
    if rows and passed == len(rows):
        return "reproduced", rows
    return ("partial" if passed else "not_reproduced"), rows
