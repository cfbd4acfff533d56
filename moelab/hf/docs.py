"""The generated parts of docs/hf.md: the registry table and the measured family coverage.

Both live between HTML-comment markers (``<!-- registry:start -->`` ... ``<!-- registry:end
-->``, the same for ``coverage``); :func:`write_doc_table` rewrites them, :func:`doc_drift`
says which one is stale (a test keeps docs/hf.md current).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.hf.families import family_table


def coverage_table(data: dict[str, Any]) -> str:
    """One line per installed family from ``results/hf_coverage.json``'s data."""
    lines = [
        data["summary"]["line"] + ".",
        "",
        "| family | router class | rule (source) | bias slot | profile | attach / finetune |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in sorted(data["families"].items()):
        if row.get("build") or row.get("find"):
            why = f"not built: {row['build']}" if row.get("build") else f"{row['find']}"
            lines.append(f"| {name} | — | {why} | — | no | no |")
            continue
        rule = f"{row['rule'] or 'none'} ({row['rule_source'] or '—'})"
        slot = f"`{row['bias_slot']}`" if row["bias_slot"] else "—"
        why = {k: row[k] for k in ("identity_check", "bias_check", "finetune_check") if row[k]}
        attach = "yes" if row["attach"] else f"no: {next(iter(why.values()), '')}"
        profile = "yes" if row["profile"] else f"no: {row['profile_check']}"
        lines.append(
            f"| {name} | `{row['router_class']}` | {rule} | {slot} | {profile} | {attach} |"
        )
    return "\n".join(line.replace("\n", " ") for line in lines) + "\n"


def _sections(data: dict[str, Any] | None) -> dict[str, str]:
    out = {"registry": family_table()}
    if data is not None:
        out["coverage"] = coverage_table(data)
    return out


def _replace(text: str, key: str, body: str) -> str:
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"the generated {key!r} section lacks its {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def readme_line(data: dict[str, Any]) -> str:
    """The README's coverage sentence, from the measured data."""
    return data["summary"]["line"] + " ([docs/hf.md](docs/hf.md)).\n"


def _texts(path: Path, data: dict[str, Any] | None) -> dict[Path, dict[str, str]]:
    out = {path: _sections(data)}
    readme = path.parent.parent / "README.md"
    if data is not None and readme.is_file() and "<!-- hf-coverage:start -->" in readme.read_text():
        out[readme] = {"hf-coverage": readme_line(data)}
    return out


def write_doc_table(path: str | Path, data: dict[str, Any] | None) -> None:
    """Rewrite the generated sections of ``path`` (coverage only when ``data`` is given) and
    the coverage sentence of the README beside its folder."""
    for file, sections in _texts(Path(path), data).items():
        text = file.read_text(encoding="utf-8")
        for key, body in sections.items():
            text = _replace(text, key, body)
        file.write_text(text, encoding="utf-8")


def doc_drift(path: str | Path, data: dict[str, Any] | None) -> list[str]:
    """The generated sections (docs/hf.md, the README's sentence) that differ from what the
    registry and the measured data give."""
    stale = []
    for file, sections in _texts(Path(path), data).items():
        text = file.read_text(encoding="utf-8")
        stale += [key for key, body in sections.items() if _replace(text, key, body) != text]
    return stale
