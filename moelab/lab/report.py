"""``moelab lab report``: results/README.md (Markdown summary) and results/index.html (plots)."""

from __future__ import annotations

import functools
import html
import json
import subprocess
from pathlib import Path
from typing import Any

import tomllib

from moelab.lab.spec import experiment_names, load_experiment

COLUMNS = [
    ("val_loss", "val loss"),
    ("maxvio_global", "MaxVio_global"),
    ("maxvio_batch_tail", "MaxVio_batch (last 25%)"),
    ("maxvio_seq", "MaxVio_seq"),
    ("dead_val", "dead (val)"),
    ("max_over_mean", "max/mean"),
    ("cv", "CV"),
    ("drop_rate", "drop"),
    ("mi", "MI (bits)"),
    ("spikes", "spikes"),
    ("seconds_per_step", "s/step"),
]
MARK = {
    "reproduced": "✅ reproduced",
    "partial": "🟡 partial",
    "not_reproduced": "❌ not reproduced",
    "inconclusive": "⚪ inconclusive",
}
OUTCOME = {"holds": "✓ holds", "fails": "✗ fails", "inconclusive": "? inconclusive"}


def _fmt(m: dict[str, Any] | None) -> str:
    if not m:
        return "–"
    mean, std, n = m["mean"], m.get("std"), m.get("n", 1)
    text = f"{mean:.3g}" if abs(mean) < 1000 else f"{mean:.0f}"
    return f"{text} ± {std:.2g}" if n > 1 and std is not None else text


def _number(v: Any) -> str:
    """A float to 3 significant digits, lists item by item, a per-seed statistic (a dict with
    ``mean`` and ``values``) as mean ± SD with its values."""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict) and "mean" in v and "values" in v:
        return f"{_fmt(v)} (per seed {_number(v['values'])})"
    if isinstance(v, list):
        return "[" + ", ".join(_number(x) for x in v) + "]"
    return str(v)


def status(res: dict[str, Any], all_variants: list[str]) -> str:
    """Run size (quick / decisive / too short) and whether every variant was trained."""
    if res.get("quick"):
        return "quick only"
    size = "decisive" if not res.get("too_short") else "too short for a verdict"
    not_run = [v for v in all_variants if v not in res.get("variants_run", [])]
    missing = res.get("missing_variants") or []
    if missing:
        return f"{size}, incomplete: not trained {', '.join(missing)}"
    if not_run:
        return f"{size}, reduced set (not run: {', '.join(not_run)})"
    return size


def verdict_text(res: dict[str, Any]) -> str:
    """The verdict, or 'undecided' when every check lacks a number (its runs were not trained)."""
    if res["checks"] and all(c.get("undecided") for c in res["checks"]):
        return "⏸ undecided (runs missing)"
    return MARK.get(res["verdict"], res["verdict"])


def experiment_markdown(res: dict[str, Any], folder: str, all_variants: list[str]) -> str:
    st = status(res, all_variants)
    lines = [
        f"## {res['number']}. {res['title']}",
        "",
        f"**Verdict: {verdict_text(res)}** · run: {st} · seeds: {res['seeds']} · "
        f"batch {res['batch_tokens']} tokens · "
        f"**{res['tokens_per_expert_per_step']:.0f} tokens per expert per step**",
        "",
        f"Claim: {' '.join(res['claim'].split())}",
        "",
        "Paper numbers:",
        "",
    ]
    lines += [f"- {k}: {_number(v)}" for k, v in res["paper"].items()]
    cols = [c for c in COLUMNS if any(c[0] in m for m in res["measured"].values())]
    lines += ["", "| variant | tok/expert/step | " + " | ".join(t for _, t in cols) + " |"]
    lines.append("|---" * (len(cols) + 2) + "|")
    for name, m in res["measured"].items():
        tpe = res.get("setup", {}).get(name, {}).get("tokens_per_expert_per_step")
        cells = " | ".join(_fmt(m.get(k)) for k, _ in cols)
        lines.append(f"| {name} | {tpe if tpe is None else f'{tpe:.0f}'} | {cells} |")
    extra = {k: v for k, v in res["analysis"].items() if k != "error"}
    if extra:
        lines += ["", "Analysis:", ""]
        for k, v in extra.items():
            if isinstance(v, dict):
                short = {a: b for a, b in v.items() if not isinstance(b, list) or len(b) <= 9}
                lines.append(f"- {k}: " + ", ".join(f"{a}={_number(b)}" for a, b in short.items()))
            else:
                lines.append(f"- {k}: {_number(v)}")
    if "error" in res["analysis"]:
        lines += ["", f"Analysis error: `{res['analysis']['error']}`"]
    lines += ["", *checks_markdown(res, folder)]
    lines += [line for n in res.get("notes", []) for line in ("", f"Note: {n}")]
    lines += ["", "Plots: " + " · ".join(f"[{p}]({folder}/{p})" for p in res["plots"]), ""]
    return "\n".join(lines)


def checks_markdown(res: dict[str, Any], folder: str) -> list[str]:
    """The checks as a table: kind, outcome, margin Δ with its 95 % CI, MDE, the paper's Δ,
    flip rate, notes and provenance (written before the runs or revised, from git)."""
    if res.get("too_short"):
        head = [f"Runs too short for a verdict: {res['too_short']}.", ""]
    else:
        head = []
    rows = [
        "| kind | check | outcome | Δ = lhs − bound [95 % CI] | MDE | paper Δ | flip rate | "
        "provenance | why |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["checks"]:
        rows.append("| " + " | ".join(_check_cells(c, folder)) + " |")
    return [*head, *rows]


def ci_caveat(c: dict[str, Any]) -> str:
    """' (by 2 SE; its 95 % CI includes 0)' for a decided check whose t-based CI still holds
    the bound: with few seeds (df = 2: t = 4.30) the 2-SE rule decides more than the CI does,
    and the reader should see that such an outcome is the weaker kind; else ''."""
    ci = c.get("ci95")
    if c.get("outcome") in ("holds", "fails") and ci and ci[0] < 0 < ci[1]:
        return " (by 2 SE; its 95 % CI includes 0)"
    return ""


def _check_cells(c: dict[str, Any], folder: str) -> list[str]:
    out = OUTCOME.get(c.get("outcome", ""), "?") + ci_caveat(c)
    if c.get("note"):
        out += " (too short)" if c["note"].startswith("too short") else f" ({c['note']})"
    elif c.get("raw_outcome") not in (None, c.get("outcome")):
        out += f" (2-SE rule: {c['raw_outcome']})"
    delta = "–" if c.get("delta") is None else f"{c['delta']:+.3g}"
    if c.get("ci95"):
        delta += f" [{c['ci95'][0]:+.3g}, {c['ci95'][1]:+.3g}]"
    mde = "–" if c.get("mde") is None else f"{c['mde']:.3g}"
    paper = "–" if c.get("paper") is None else f"{c['paper']:+.3g}"
    flip = "–" if c.get("flip_rate") is None else f"{c['flip_rate']:.0%}"
    prov = provenance(folder, c)
    return [c.get("kind", "key"), f"`{c['check']}`", out, delta, mde, paper, flip, prov, c["why"]]


def provenance(folder: str, c: dict[str, Any]) -> str:
    """'written before the runs' only where git shows the check's text in the experiment file
    of the commit that first added ``results/FOLDER/result.json``; else its ``revised`` note or
    'added after results (undated)'."""
    if c.get("revised"):
        return f"revised after results on {c['revised']}"
    first = first_result_checks(folder)
    if first is None:
        return "written before the runs"  # no committed result yet
    return "written before the runs" if c["check"] in first else "added after results (undated)"


# Where the suite's files are and were (they moved into the package on 2026-12-01).
_SUITE_PATHS = ("moelab/lab/experiments/{}.toml", "experiments/{}.toml")


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout


@functools.cache
def first_result_checks(folder: str) -> frozenset[str] | None:
    """Check texts of the experiment FOLDER at the commit that first added its result.json
    (None without git or without a committed result)."""
    from moelab.lab.spec import EXPERIMENTS, Check

    try:
        root = Path(_git(EXPERIMENTS, "rev-parse", "--show-toplevel").strip())
        log = _git(root, "log", "--diff-filter=A", "--format=%H", "--",
                   f"results/{folder}/result.json").split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    if not log:
        return None
    for path in _SUITE_PATHS:
        try:
            text = _git(root, "show", f"{log[-1]}:{path.format(folder)}")
            break
        except subprocess.CalledProcessError:
            continue
    else:
        return None
    keys = ("lhs", "op", "rhs", "factor", "offset")
    old = tomllib.loads(text).get("checks", [])
    return frozenset(Check(**{k: c[k] for k in keys if k in c}).text() for c in old)


def load_results(root: Path) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(folder, result, all variant names) for every experiment with a result, in suite order."""
    found = []
    for name in experiment_names():
        path = root / name / "result.json"
        if path.exists():
            found.append((name, json.loads(path.read_text()), list(load_experiment(name).variants)))
    return sorted(found, key=lambda t: _order(t[1]["number"]))


def _order(number: str) -> tuple[int, str]:
    digits = "".join(ch for ch in number if ch.isdigit())
    return int(digits or 0), number


def summary_table(found) -> str:
    lines = [
        "| # | experiment | verdict | run | tokens/expert/step | key checks |",
        "|---|---|---|---|---|---|",
    ]
    for folder, res, allv in found:
        key = [c.get("outcome", "inconclusive") for c in res["checks"] if c.get("kind") != "sanity"]
        tally = ", ".join(f"{key.count(o)} {o}" for o in ("holds", "fails", "inconclusive"))
        tpe = sorted({s["tokens_per_expert_per_step"] for s in res.get("setup", {}).values()})
        tpe_text = f"{tpe[0]:.0f}" if len(tpe) == 1 else f"{tpe[0]:.0f}–{tpe[-1]:.0f}"
        lines.append(
            f"| {res['number']} | [{folder}](#{folder}) | {verdict_text(res)} | "
            f"{status(res, allv)} | {tpe_text} | {tally} |"
        )
    return "\n".join(lines)


BEGIN, END = "<!-- moelab lab report: begin -->", "<!-- moelab lab report: end -->"


def findings_markdown(found) -> str:
    """What the lab's numbers decide, one bullet per key check of every experiment: its
    outcome, Δ with 95 % CI and MDE; experiments not yet run at their decisive size say so."""
    lines = []
    for folder, res, _ in found:
        head = f"- **{res['number']}. {res['title']}** ([details](results/README.md#{folder})): "
        if res.get("quick") or res.get("too_short"):
            lines.append(head + f"not yet run at its decisive size ({res.get('too_short')}).")
            continue
        lines.append(head + f"{verdict_text(res)}, {seeds_text(res)}.")
        for c in res["checks"]:
            if c.get("kind") == "sanity":
                continue
            lines.append(f"  - `{c['check']}`: {_outcome_text(c)}")
    ran = {folder for folder, _, _ in found}
    for name in experiment_names():  # in the suite, never run: say so too
        if name not in ran:
            exp = load_experiment(name)
            lines.append(f"- **{exp.number}. {exp.title}**: not yet run.")
    return "\n".join(lines)


def seeds_text(res: dict[str, Any]) -> str:
    """Seeds behind the result: the runs per variant actually measured (their val_loss count;
    a range when some variants have fewer finished seeds than asked for)."""
    ns = {v["val_loss"]["n"] for v in res["measured"].values() if "val_loss" in v}
    ns = ns or {res["seeds"]}
    lo, hi = min(ns), max(ns)
    return f"{hi} seeds" if lo == hi else f"{lo}–{hi} seeds per variant"


def _outcome_text(c: dict[str, Any]) -> str:
    text = OUTCOME.get(c.get("outcome", ""), "?")
    if c.get("delta") is not None:
        text += f", Δ {c['delta']:+.3g}"
    if c.get("ci95"):
        text += f" [{c['ci95'][0]:+.3g}, {c['ci95'][1]:+.3g}]"
    if c.get("mde") is not None:
        text += f", MDE {c['mde']:.3g}"
    text += ci_caveat(c)
    return text + (f" — {c['note']}" if c.get("note") else "")


def update_readme(readme: Path, found) -> bool:
    """Replace the block between BEGIN and END in ``readme`` with :func:`findings_markdown`;
    False (nothing written) when the file has no such block."""
    if not readme.exists():
        return False
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + findings_markdown(found) + "\n" + END + tail)
    return True


def write_report(root: Path, preamble: str = "") -> list[Path]:
    """Write ``root/README.md`` and ``root/index.html`` from ``root/*/result.json``, and the
    generated findings block of the repository README (when it has one)."""
    from moelab.report import markdown_to_html

    found = load_results(root)
    pre = root / "PREAMBLE.md"
    intro = preamble or (pre.read_text() if pre.exists() else "")
    sections = [experiment_markdown(res, folder, allv) for folder, res, allv in found]
    md = "\n\n".join(
        ["# moelab lab results", intro, "## Summary", summary_table(found),
         "## What the numbers decide", findings_markdown(found).replace("results/README.md", ""),
         *sections]
    )  # fmt: skip
    (root / "README.md").write_text(md + "\n")
    body = [markdown_to_html("# moelab lab results\n\n" + intro)]
    body.append(markdown_to_html("## Summary\n\n" + summary_table(found)))
    for (folder, res, _), sec in zip(found, sections, strict=True):
        body.append(f'<section id="{html.escape(folder)}">' + markdown_to_html(sec))
        body += [f'<img src="{folder}/{p}" alt="{p}" style="max-width:100%">' for p in res["plots"]]
        body.append("</section>")
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>moelab lab</title>'
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
        "</head><body>" + "\n".join(body) + "</body></html>"
    )
    (root / "index.html").write_text(page)
    written = [root / "README.md", root / "index.html"]
    readme = root.resolve().parent / "README.md"
    if update_readme(readme, found):
        written.append(readme)
    return written
