"""Is a moelab run reproducible on one machine, at 1 and 2 threads, idle and under CPU load?

Trains the numerics-fingerprint micro run (moelab.lab.fingerprint) ``--repeats`` times at each
thread count in fresh processes, optionally while ``--load N`` busy-loop processes compete for
the cores, and with MKL's dynamic thread adjustment on (default) or pinned off. Writes JSON:
per configuration the distinct loss sequences seen (1 = reproducible) and whether 1 and 2
threads agree. The noise experiment's analysis reads results/noise/determinism.json:

    python scripts/determinism.py --out results/noise/determinism.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

CHILD = """
import json, sys, torch
from moelab.lab import fingerprint as f
from moelab.runconfig import build_config
from moelab.train import train
import copy, tempfile
from pathlib import Path
from moelab.logs import read_rows
threads = int(sys.argv[1])
d = copy.deepcopy(f.MICRO); d["train"]["threads"] = threads; d["train"]["steps"] = 40
cfg = build_config(d, f.SETS)
with tempfile.TemporaryDirectory() as tmp:
    train(cfg, Path(tmp) / "r", progress=False)
    rows = read_rows(Path(tmp) / "r" / "metrics.jsonl")
print(json.dumps([r["loss"] for r in rows if "loss" in r]))
"""


def _burn(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x += 1


def run_child(threads: int, env: dict[str, str]) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads)], capture_output=True, text=True, env=env,
        check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--load", type=int, default=2, help="busy-loop processes in the loaded runs")
    args = ap.parse_args()
    res: dict[str, object] = {}
    seqs: dict[str, list[list[float]]] = {}
    for mkl_dynamic in ("default", "FALSE"):
        env = dict(os.environ)
        if mkl_dynamic == "FALSE":
            env["MKL_DYNAMIC"] = "FALSE"
        for load in (0, args.load):
            procs = [mp.Process(target=_burn, args=(time.time() + 3600,)) for _ in range(load)]
            for p in procs:
                p.start()
            try:
                for threads in (1, 2):
                    key = f"threads={threads} load={load} MKL_DYNAMIC={mkl_dynamic}"
                    seqs[key] = [run_child(threads, env) for _ in range(args.repeats)]
                    print(key, len({json.dumps(s) for s in seqs[key]}), "distinct", flush=True)
            finally:
                for p in procs:
                    p.terminate()
    for key, ss in seqs.items():
        res[key] = {
            "distinct_runs": len({json.dumps(s) for s in ss}),
            "final_losses": [s[-1] for s in ss],
        }
    every = {json.dumps(s) for k, ss in seqs.items() if "threads=1" in k for s in ss}
    every2 = {json.dumps(s) for k, ss in seqs.items() if "threads=2" in k for s in ss}
    res["all_1_thread_runs_identical"] = len(every) == 1
    res["all_2_thread_runs_identical"] = len(every2) == 1
    res["1_and_2_threads_identical"] = every == every2
    res["note"] = "background lab runs may have been training during this measurement"
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
