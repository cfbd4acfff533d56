"""JSON for scripts/device_check.sh: a pytest JUnit file summarised, two runs' losses compared,
and the script's step log (``name rc seconds`` per line) as one record.

    python scripts/device_report.py junit JUNIT.xml OUT.json
    python scripts/device_report.py losses RUN_A RUN_B OUT.json [--rtol 1e-4]
    python scripts/device_report.py steps STEPS.txt OUT.json [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import platform
import xml.etree.ElementTree as ET
from pathlib import Path


def junit(path: Path) -> dict:
    """Counts and the failed / skipped tests (with the first line of why) of a JUnit file."""
    if not path.is_file():
        return {"error": f"no JUnit file at {str(path)!r} (pytest did not finish)"}
    cases = list(ET.parse(path).getroot().iter("testcase"))
    out: dict = {"tests": len(cases), "passed": 0, "failed": {}, "skipped": {}}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            out["failed"][name] = (bad.get("message") or "").splitlines()[:1]
        elif skip is not None:
            out["skipped"][name] = skip.get("message", "")
        else:
            out["passed"] += 1
    return out


def losses(a: Path, b: Path, rtol: float) -> dict:
    """Logged training losses of two run folders, step by step, and whether they agree."""
    la, lb = _losses(a), _losses(b)
    steps = sorted(set(la) & set(lb))
    rel = {s: abs(la[s] - lb[s]) / abs(la[s]) for s in steps}
    return {
        "a": str(a),
        "b": str(b),
        "steps": steps,
        "loss_a": [la[s] for s in steps],
        "loss_b": [lb[s] for s in steps],
        "max_rel_diff": max(rel.values(), default=None),
        "rtol": rtol,
        "within": bool(steps) and max(rel.values()) <= rtol,
    }


def _losses(run: Path) -> dict[int, float]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return {}
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def steps(path: Path, dry_run: bool) -> dict:
    """The step log as ``{name: {"rc": int, "seconds": float}}`` with the machine named."""
    record: dict = {"dry_run": dry_run, "host": platform.node(), "steps": {}}
    try:
        import torch

        record["torch"] = torch.__version__
        record["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        record["torch"] = None
    for line in path.read_text().splitlines() if path.is_file() else []:
        name, rc, secs = line.split()
        record["steps"][name] = {"rc": int(rc), "seconds": float(secs)}
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("junit")
    j.add_argument("file", type=Path)
    j.add_argument("out", type=Path)
    lo = sub.add_parser("losses")
    lo.add_argument("a", type=Path)
    lo.add_argument("b", type=Path)
    lo.add_argument("out", type=Path)
    lo.add_argument("--rtol", type=float, default=1e-4)
    s = sub.add_parser("steps")
    s.add_argument("file", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    if args.cmd == "junit":
        result = junit(args.file)
    elif args.cmd == "losses":
        result = losses(args.a, args.b, args.rtol)
    else:
        result = steps(args.file, args.dry_run)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
