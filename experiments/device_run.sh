#!/usr/bin/env bash
# Run the default-size suite on a many-core machine: phase 1 trains every distinct run in
# parallel (priority order) until a deadline; phase 2 analyses whatever finished, in parallel.
# Usage: bash experiments/device_run.sh TRAIN_SECONDS JOBS
set -u
TRAIN_S=${1:-300}; JOBS=${2:-8}
PY=${PYTHON:-python3}
ORDER=${ORDER:-"collapse computation_batch loss_free_vs_aux scope batch_size capacity fluctuation leakage dead_experts stability experts_k"}
setsid $PY -m moelab lab run $ORDER --variants reduced --jobs "$JOBS" --pretrain-only > logs_pretrain.txt 2>&1 &
PID=$!
for _ in $(seq "$TRAIN_S"); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
kill -- -"$PID" 2>/dev/null; sleep 2
for e in $ORDER; do
  OMP_NUM_THREADS=1 timeout "${ANALYSE_S:-300}" $PY -m moelab lab run "$e" --variants reduced --cached-only > "logs_$e.txt" 2>&1 &
done
wait
