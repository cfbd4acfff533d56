"""Paired A/B summary of ``benchmarks/moe_layer.py`` runs: code A vs code B, same machine.

Each pair (A_i, B_i) ran back to back in one quiet window; the figure compared is moelab's
time over the dense floor's within each run (``ratio_to_dense_median``, 2-thread wall, and
``one_thread_cpu_ratio_to_dense``), so machine drift cancels. Per config it writes each run's
ratios, B/A per pair, and whether B is slower than A beyond A's own round-to-round spread
(every pair's B above the upper quartile of its A).

Usage: ``python benchmarks/ab_summary.py --a A1.json A2.json --b B1.json B2.json --out OUT.json``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ratios(path: str) -> dict[str, dict[str, float]]:
    speed = json.loads(Path(path).read_text())["speed"]
    return {
        cfg: {
            "wall": v["ratio_to_dense_median"]["moelab"],
            "wall_q3": v["ratio_to_dense_quartiles"]["moelab"][2],
            "cpu_1thread": v["one_thread_cpu_ratio_to_dense"]["moelab"],
        }
        for cfg, v in speed.items()
    }


def summarise(a_paths: list[str], b_paths: list[str]) -> dict:
    """Per config: A's and B's moelab/dense ratios per run, B/A per pair, the verdict."""
    a, b = [_ratios(p) for p in a_paths], [_ratios(p) for p in b_paths]
    out = {}
    for cfg in a[0]:
        pairs = list(zip(a, b, strict=True))
        slower = all(rb[cfg]["wall"] > ra[cfg]["wall_q3"] for ra, rb in pairs)
        out[cfg] = {
            "a_wall": [r[cfg]["wall"] for r in a],
            "b_wall": [r[cfg]["wall"] for r in b],
            "b_over_a_wall": [rb[cfg]["wall"] / ra[cfg]["wall"] for ra, rb in pairs],
            "a_cpu_1thread": [r[cfg]["cpu_1thread"] for r in a],
            "b_cpu_1thread": [r[cfg]["cpu_1thread"] for r in b],
            "b_over_a_cpu_1thread": [
                rb[cfg]["cpu_1thread"] / ra[cfg]["cpu_1thread"] for ra, rb in pairs
            ],
            "verdict": "B slower beyond A's spread" if slower else "no slowdown beyond the spread",
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", nargs="+", required=True, help="moe_layer.json files of code A")
    ap.add_argument("--b", nargs="+", required=True, help="the paired files of code B")
    ap.add_argument("--about", default="", help="what A and B are")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = {"about": args.about, "a": args.a, "b": args.b, "configs": summarise(args.a, args.b)}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for cfg, v in res["configs"].items():
        ba = ", ".join(f"{x:.2f}" for x in v["b_over_a_wall"])
        print(f"{cfg}: B/A (moelab/dense, wall) {ba}: {v['verdict']}")


if __name__ == "__main__":
    main()
