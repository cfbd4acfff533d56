"""``moelab lab report``: results/README.md (Markdown summary) and results/index.html (plots)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

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
}


def _fmt(m: dict[str, Any] | None) -> str:
    if not m:
        return "–"
    mean, std, n = m["mean"], m.get("std", 0.0), m.get("n", 1)
    text = f"{mean:.3g}" if abs(mean) < 1000 else f"{mean:.0f}"
    return f"{text} ± {std:.2g}" if n > 1 else text


def _number(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(_number(x) for x in v) + "]"
    return str(v)


def status(res: dict[str, Any], all_variants: list[str]) -> str:
    """Whether this is a full default-size result, an incomplete one, or quick only."""
    if res.get("quick"):
        return "quick only"
    not_run = [v for v in all_variants if v not in res.get("variants_run", [])]
    missing = res.get("missing_variants") or []
    if missing:
        return f"default, incomplete: not trained {missing}"
    if not_run:
        return f"default, reduced set (not run: {not_run})"
    return "default"


def verdict_text(res: dict[str, Any]) -> str:
    """The verdict, or 'undecided' when every check lacks a number (its runs were not trained)."""
    if res["checks"] and all(c.get("undecided") for c in res["checks"]):
        return "⏸ undecided (runs missing)"
    return MARK[res["verdict"]]


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
    lines += ["", "Checks (written before the runs):", ""]
    for c in res["checks"]:
        mark = "✓" if c["passed"] else ("?" if c.get("undecided") else "✗")
        lines.append(
            f"- {mark} `{c['check']}`: {_number(c['lhs'])} vs {_number(c['bound'])} — {c['why']}"
        )
    lines += [f"Note: {n}" for n in res.get("notes", [])]
    lines += ["", "Plots: " + " · ".join(f"[{p}]({folder}/{p})" for p in res["plots"]), ""]
    return "\n".join(lines)


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
        "| # | experiment | verdict | run | tokens/expert/step | headline |",
        "|---|---|---|---|---|---|",
    ]
    for folder, res, allv in found:
        passed = sum(c["passed"] for c in res["checks"])
        tpe = sorted({s["tokens_per_expert_per_step"] for s in res.get("setup", {}).values()})
        tpe_text = f"{tpe[0]:.0f}" if len(tpe) == 1 else f"{tpe[0]:.0f}–{tpe[-1]:.0f}"
        lines.append(
            f"| {res['number']} | [{folder}](#{folder}) | {verdict_text(res)} | "
            f"{status(res, allv)} | {tpe_text} | {passed}/{len(res['checks'])} checks pass |"
        )
    return "\n".join(lines)


def write_report(root: Path, preamble: str = "") -> list[Path]:
    """Write ``root/README.md`` and ``root/index.html`` from ``root/*/result.json``."""
    from moelab.report import markdown_to_html

    found = load_results(root)
    pre = root / "PREAMBLE.md"
    intro = preamble or (pre.read_text() if pre.exists() else "")
    sections = [experiment_markdown(res, folder, allv) for folder, res, allv in found]
    md = "\n\n".join(["# moelab lab results", intro, "## Summary", summary_table(found), *sections])
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
    return [root / "README.md", root / "index.html"]
