#!/usr/bin/env bash
# The lab's decisive runs on the GPU in the minutes left after scripts/device_check.sh: trains
# the experiments' decisive runs (`moelab lab run NAMES --decisive --pretrain-only`, JOBS
# processes sharing the GPU; train.device is "auto", so every run takes it) until SECONDS
# have passed, then returns the run folders that finished (summary.json written; checkpoints
# and TensorBoard files left out) as $OUT/lab_runs.tgz (split into 15 MiB parts
# lab_runs.tgz.part-aa, ... when larger), with lab_runs.json (which runs, on which device)
# and lab_runs.log. Unpack here with `cat lab_runs.tgz* | tar xz` in the repository root: the
# folders land in runs/lab/cache/, where `moelab lab run NAME --decisive --cached-only` finds
# them (their fingerprint is the code's, computed on the CPU).
# Usage: OUT=DIR bash scripts/device_lab.sh SECONDS [JOBS]
# Env: EXPERIMENTS (default: every experiment with a [decisive] table), THREADS (per run,
#      default 2), PYTHON (default python3), DRY_RUN=1 (the --quick size on the CPU, for tests).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the folder the results go to}"
TRAIN_S=${1:?give the seconds to train for}
JOBS=${2:-8}
PY=${PYTHON:-python3}
THREADS=${THREADS:-2}
DEFAULT_EXPERIMENTS=$(grep -l '^\[decisive\]' moelab/lab/experiments/*.toml | xargs -n1 basename | sed 's/\.toml$//')
read -r -a NAMES <<<"${EXPERIMENTS:-$(echo "$DEFAULT_EXPERIMENTS" | tr '\n' ' ')}"
if [ "${#NAMES[@]}" -eq 0 ]; then echo "device_lab.sh: no experiments to run (EXPERIMENTS empty, none in moelab/lab/experiments)" >&2; exit 2; fi
SIZE=(--decisive)
if [ "${DRY_RUN:-0}" = "1" ]; then SIZE=(--quick); fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" runs/lab/cache
LOG="$OUT/lab_runs.log"
STAMP="$OUT/.lab_start"
touch "$STAMP"

echo "== lab run ${NAMES[*]} ${SIZE[*]} --jobs $JOBS --threads $THREADS for ${TRAIN_S}s" >"$LOG"
setsid "$PY" -m moelab lab run "${NAMES[@]}" "${SIZE[@]}" --pretrain-only --jobs "$JOBS" \
  --threads "$THREADS" >>"$LOG" 2>&1 &
PID=$!
for _ in $(seq "$TRAIN_S"); do
  kill -0 "$PID" 2>/dev/null || break
  sleep 1
done
kill -- -"$PID" 2>/dev/null
sleep 2

# Run folders finished since the start: a summary.json newer than the stamp, at the config's
# last step (a snapshotted run writes one after every segment) and no partial snapshots left.
mapfile -t TOUCHED < <(find runs/lab/cache -mindepth 2 -maxdepth 2 -name summary.json -newer "$STAMP" -printf '%h\n' | sort)
mapfile -t DONE < <("$PY" - "$OUT/lab_runs.json" "${TOUCHED[@]}" <<'PY'
import json, sys
from pathlib import Path

from moelab.lab.runner import finished

out, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
runs = {}
for d in dirs:
    if not finished(d):
        continue  # e.g. one segment of a snapshotted run
    summary = json.loads((d / "summary.json").read_text())
    runs[d.name] = {k: summary.get(k) for k in ("steps", "val_loss", "device", "seconds")}
    print(d)
out.write_text(json.dumps({"finished": len(runs), "runs": runs}, indent=2) + "\n")
PY
)
if [ "${#DONE[@]}" -gt 0 ]; then
  tar czf "$OUT/lab_runs.tgz" --exclude='ckpt-*.pt' --exclude='events.out.tfevents.*' \
    --exclude='*.lock' "${DONE[@]}"
  if [ "$(stat -c %s "$OUT/lab_runs.tgz")" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15m "$OUT/lab_runs.tgz" "$OUT/lab_runs.tgz.part-" && rm "$OUT/lab_runs.tgz"
  fi
fi
rm -f "$STAMP"
echo "== ${#DONE[@]} runs finished" >>"$LOG"
