#!/usr/bin/env bash
# Run the default-size suite on a many-core machine: phase 1 trains every distinct run in
# parallel (seed-major priority order) until a deadline; phase 2 analyses whatever finished, in
# parallel. With $OUT set (the lent machine), results/ and the logs come back as one tarball.
# Usage: bash scripts/device_run.sh TRAIN_SECONDS JOBS
# Env: ORDER (experiments), VARIANTS (reduced|all|a,b), THREADS (per run; 0 = the files'),
#      SEEDS (per variant; empty = the files'), ANALYSE_S, PYTHON.
set -u
TRAIN_S=${1:-300}; JOBS=${2:-8}
PY=${PYTHON:-python3}
ORDER=${ORDER:-"collapse computation_batch loss_free_vs_aux scope batch_size capacity fluctuation leakage dead_experts stability experts_k"}
VARIANTS=${VARIANTS:-reduced}; THREADS=${THREADS:-0}
ARGS=(--variants "$VARIANTS" --threads "$THREADS")
if [ -n "${SEEDS:-}" ]; then ARGS+=(--seeds "$SEEDS"); fi
setsid $PY -m moelab lab run $ORDER "${ARGS[@]}" --jobs "$JOBS" --pretrain-only > logs_pretrain.txt 2>&1 &
PID=$!
for _ in $(seq "$TRAIN_S"); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
kill -- -"$PID" 2>/dev/null; sleep 2
for e in $ORDER; do
  OMP_NUM_THREADS=1 timeout "${ANALYSE_S:-300}" $PY -m moelab lab run "$e" "${ARGS[@]}" --cached-only > "logs_$e.txt" 2>&1 &
done
wait
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" logs_*.txt $(for e in $ORDER; do echo "results/$e"; done)
fi
