"""Measure moelab.hf on every MoE family of the installed transformers; write the numbers.

For each family (``moelab.hf.tiny.moe_families``) a tiny random model of its text path is built
from its config class (hidden 32, 2 layers, 8 experts, top-2; nothing downloaded) and the four
checks of ``moelab.hf.checks`` run on fresh copies: profile counts == the experts' own calls,
attach at zero bias bit-identical, a large bias on one expert routes every token there, 5
fine-tuning steps move the bias and the saved model reloads with it.

Writes ``results/hf_coverage.json`` and the family table of docs/hf.md (between the
``<!-- families -->`` markers). Run: ``python scripts/hf_coverage.py`` (a few minutes on CPU);
``--only mixtral deepseek_v3`` to look at a few without writing; ``--resume`` to carry on an
interrupted run (the results file is rewritten after every family).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moelab.hf import checks  # noqa: E402
from moelab.hf.docs import write_doc_table  # noqa: E402
from moelab.hf.routers import find_routers  # noqa: E402
from moelab.hf.tiny import family_model, moe_families  # noqa: E402

OUT = ROOT / "results" / "hf_coverage.json"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def _run(check, model_type: str, *args) -> str | None:
    try:
        return check(family_model(model_type), *args)
    except Exception as exc:  # a family's failure is a measured result, not a crash
        return _first_line(exc)


def _describe(model_type: str) -> dict[str, Any]:
    from moelab.hf.attach import site_mode

    sites = find_routers(family_model(model_type))
    s = sites[0]
    return {
        "router_class": type(s.module).__name__,
        "registry_row": s.family.name if s.family else None,
        "rule": s.rule.describe() if s.rule else None,
        "rule_source": "registry" if s.family else ("inferred" if s.inferred else None),
        "output": list(s.output),
        "bias_slot": (s.family.bias if s.family else s.extra.get("bias")),
        "num_experts": s.num_experts,
        "num_null": s.num_null,
        "moe_layers": len(sites),
        "attach_mode": sorted({site_mode(x) for x in sites}),
    }


def measure(model_type: str) -> dict[str, Any]:
    """Every check on one family; failures are one-line reasons."""
    start = time.perf_counter()
    try:
        family_model(model_type)
    except Exception as exc:
        return {"build": _first_line(exc), "find": None, "profile": False, "attach": False}
    try:
        row = _describe(model_type)
    except Exception as exc:
        return {"build": None, "find": _first_line(exc), "profile": False, "attach": False}
    row["build"] = row["find"] = None
    row["profile_check"] = _run(checks.check_profile, model_type)
    row["identity_check"] = _run(checks.check_identity, model_type)
    row["bias_check"] = _run(checks.check_bias_routes, model_type)
    with tempfile.TemporaryDirectory() as tmp:
        row["finetune_check"] = _run(checks.check_finetune, model_type, tmp)
    row["profile"] = row["profile_check"] is None
    attach_checks = ("identity_check", "bias_check", "finetune_check")
    row["attach"] = all(row[k] is None for k in attach_checks)
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def summarize(rows: dict[str, dict]) -> dict[str, Any]:
    import transformers

    n = len(rows)
    built = [k for k, r in rows.items() if r.get("build") is None]
    found = [k for k in built if rows[k].get("find") is None]
    prof = sum(r["profile"] for r in rows.values())
    att = sum(r["attach"] for r in rows.values())
    return {
        "transformers": transformers.__version__,
        "installed_families": n,
        "built": len(built),
        "routers_found": len(found),
        "profile_exact": prof,
        "attach_finetune": att,
        "line": (
            f"profile exact on {prof} of {n} installed MoE families ({100 * prof / n:.0f} %), "
            f"attach/finetune on {att} of {n} ({100 * att / n:.0f} %); transformers "
            f"{transformers.__version__}; {n - len(built)} not built, {len(built) - len(found)} "
            "with no router found"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=None, help="these families; write nothing")
    parser.add_argument(
        "--resume", action="store_true", help="keep the families already in the results file"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    families = args.only or moe_families()
    rows = {}
    if args.resume and OUT.is_file():
        rows = {k: v for k, v in json.loads(OUT.read_text())["families"].items() if k in families}
    for mt in families:
        if mt not in rows:
            rows[mt] = measure(mt)
            if args.only is None:  # after every family: an interrupted run can --resume
                _write(rows, complete=False)
        bad = {k: v for k, v in rows[mt].items() if k.endswith(("_check", "build", "find")) and v}
        line = f"{mt:28s} profile {rows[mt]['profile']!s:5} attach {rows[mt]['attach']!s:5} {bad}"
        print(line, flush=True)
    summary = summarize(rows)
    print(summary["line"])
    if args.only is None:
        _write(rows, complete=True)
        write_doc_table(ROOT / "docs" / "hf.md", json.loads(OUT.read_text()))
    return 0


def _write(rows: dict[str, dict], *, complete: bool) -> None:
    OUT.parent.mkdir(exist_ok=True)
    data = {"summary": summarize(rows), "complete": complete, "families": rows}
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(OUT)


if __name__ == "__main__":
    raise SystemExit(main())
