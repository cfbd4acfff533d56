"""A self-contained report over run folders: the summary table, the figures of
:mod:`moelab.plots` and a guide to reading them. ``write_report`` saves the PNGs and writes an
HTML page (PNGs embedded as base64, one file to mail around) and a Markdown page (PNGs beside
it).

Legend: E experts, K top-k, T tokens per computation batch.
"""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from moelab.plots import PLOTS, make_figures
from moelab.runs import Run, load_runs, maxvio_floor_approx, sampling_maxvio, summary_table


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value / 1e6:.2f}M"
    return str(value)


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """A GitHub Markdown table of :func:`summary_table` rows."""
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def table_html(rows: list[dict[str, Any]]) -> str:
    """An HTML table of :func:`summary_table` rows."""
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def floor_table(num_experts: int, top_k: int, batch_tokens: list[int]) -> str:
    """Markdown table: tokens per expert and the MaxVio floor (simulated, approx) per batch."""
    lines = [
        "| batch tokens T | tokens per expert T·k/E | floor (simulated) | sqrt(2 ln E·E/(T·k)) |",
        "|---|---|---|---|",
    ]
    for T in batch_tokens:
        trials = int(min(200, max(20, 4e6 // (T * top_k))))
        sim = sampling_maxvio(T, num_experts, top_k, trials)
        approx = maxvio_floor_approx(T, num_experts, top_k)
        lines.append(f"| {T:,} | {T * top_k / num_experts:,.0f} | {sim:.3f} | {approx:.3f} |")
    return "\n".join(lines)


def how_to_read(runs: list[Run]) -> str:
    """Markdown: how to tell whether experts are balanced and what batch size is needed."""
    moe = [r for r in runs if r.is_moe and r.num_experts]
    E, K, T = (moe[0].num_experts, moe[0].top_k, moe[0].batch_tokens) if moe else (16, 2, 2048)
    per_expert = T * K / E
    need = 2 * math.log(E) * E / (K * 0.2**2)
    sizes = sorted({256, 1024, 4096, 16384, 65536, T})
    return f"""## How to read this: are my experts balanced, and what batch size do I need?

- **MaxVio_global** (table) is (max_i c_i − mean c) / mean c of the slot counts c_i summed over
  the whole validation split (Wang et al. 2024, eq. 4). **Near 0 = balanced over the data**;
  1.0 means the busiest expert gets twice its fair share. This says whether every expert is used.
- **MaxVio_batch** (second plot) is the same number on each computation batch (one micro-batch
  on one rank). It is what the hardware feels: the busiest expert sets the step time
  (stragglers), and with a capacity factor it is where tokens get dropped.
- **Tokens per expert per step = batch tokens · k / E.** Here T = {T:,} tokens, k = {K},
  E = {E}: **{per_expert:,.0f} tokens per expert** per computation batch.
- The share of slots f_i that an expert gets in one batch is a noisy statistic: even perfectly
  uniform random routing shows MaxVio_batch ≈ sqrt(2 ln E · E / (T·k)) from sampling alone
  (the dashed line, simulated with `moelab.runs.sampling_maxvio`). A run at the dashed line
  is as balanced as a batch of that size can be; more balancing cannot push it lower, only a
  bigger batch can. Below a few hundred tokens per expert the per-batch numbers are mostly
  noise: judge balance by MaxVio_global then.
- **What batch size do I need?** For a floor of 0.2 with E = {E}, k = {K}:
  T ≥ 2 ln E · E / (k · 0.2²) ≈ {need:,.0f} tokens per computation batch (the formula is a
  little pessimistic for small E; the simulated column is the reference).

{floor_table(E, K, sizes)}

- **Collapse** shows as MaxVio_global of several (up to E − 1 = {E - 1}), red cells concentrated
  on a few experts in the heatmap, blue columns (starved experts: under a tenth of the fair
  share) and dead experts (no token for 100 steps). A balanced run has a near-white heatmap.
"""


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
]


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def markdown_to_html(md: str) -> str:
    """The small Markdown subset the report writes: ``#`` headings, ``-`` lists (with indented
    continuation lines), pipe tables and paragraphs, with inline code and bold."""
    blocks, out = re.split(r"\n\s*\n", md.strip()), []
    for block in blocks:
        lines = block.splitlines()
        if lines[0].startswith("#"):
            level = len(lines[0]) - len(lines[0].lstrip("#"))
            out.append(f"<h{level}>{_inline_html(lines[0][level:].strip())}</h{level}>")
        elif lines[0].startswith("|"):
            rows = [
                [c.strip() for c in ln.strip("|").split("|")]
                for ln in lines
                if not re.fullmatch(r"\|?[-| :]+\|?", ln)
            ]
            head = "".join(f"<th>{_inline_html(c)}</th>" for c in rows[0])
            body = "".join(
                "<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>"
                for r in rows[1:]
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif lines[0].startswith("- "):
            items = re.split(r"\n- ", "\n" + block)[1:]
            out.append(
                "<ul>"
                + "".join(f"<li>{_inline_html(' '.join(i.split()))}</li>" for i in items)
                + "</ul>"
            )
        else:
            out.append(f"<p>{_inline_html(' '.join(block.split()))}</p>")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;
padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555;font-size:.9em}
code{background:#f3f3f3;padding:0 3px}"""


def write_report(
    runs: dict[str, str | Path], out_dir: str | Path, title: str, intro_markdown: str = ""
) -> tuple[Path, Path]:
    """Write ``report.html`` (self-contained: PNGs as base64) and ``report.md`` (PNGs beside
    it) plus the PNGs into ``out_dir``; returns (html path, md path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_runs(runs)
    for name, fig in make_figures(loaded).items():
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
    table = summary_table(loaded)
    guide = how_to_read(loaded)
    md = _markdown(title, intro_markdown, table, guide)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(
        _html(title, intro_markdown, table, guide, out), encoding="utf-8"
    )
    return out / "report.html", out / "report.md"


_TABLE_NOTE = (
    "MaxVio_batch (end): mean of the last 5 logged steps. Dead: no token in the last "
    "100 steps (end of training); starved: under a tenth of the fair share 1/E on "
    "the validation split. MI: domain → expert mutual information, mean over layers."
)


def _markdown(title: str, intro: str, table: list[dict], guide: str) -> str:
    parts = [f"# {title}", intro, "## Summary", table_markdown(table), _TABLE_NOTE]
    for p in PLOTS:
        parts += [f"## {p.title}", f"![{p.title}]({p.file})", p.caption]
    parts.append(guide)
    return "\n\n".join(s for s in parts if s) + "\n"


def _html(title: str, intro: str, table: list[dict], guide: str, out: Path) -> str:
    figures = []
    for p in PLOTS:
        data = base64.b64encode((out / p.file).read_bytes()).decode("ascii")
        figures.append(
            f'<h2>{html.escape(p.title)}</h2><figure><img alt="{p.file}" '
            f'src="data:image/png;base64,{data}"><figcaption>'
            f"{_inline_html(p.caption)}</figcaption></figure>"
        )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"{markdown_to_html(intro) if intro else ''}<h2>Summary</h2>{table_html(table)}"
        f"<p><small>{_inline_html(_TABLE_NOTE)}</small></p>{''.join(figures)}"
        f"{markdown_to_html(guide)}</body></html>\n"
    )
