#!/usr/bin/env bash
# Issue 17's GPU checks in one run of under 8 minutes on one H200; JSON files under $OUT:
#   cuda_tests.json      1. the test suite's `cuda` tests (one MoE layer CPU vs CUDA at fp32,
#                           grouped GEMM vs the per-expert loop, cross-device checkpoints, ...)
#   tiny_curves.json     2. `tiny` for 200 steps on CUDA in fp32 and in bf16 against the CPU
#                           curve: loss differences (tolerance stated), tokens/s, peak memory
#   ep_nccl.json         3. EP=2 over NCCL with >= 2 GPUs against one process (else skipped)
#   moe_layer_cuda.json  4. benchmarks/moe_layer.py --device cuda: A / B / A_T256, fp32, bf16
#   device_check.json    what ran: each step's exit status and seconds, torch, the GPUs
#   device_check.log     every step's output
# Every step has its own time limit and the script goes on after a failed step, so the JSON
# of the others still comes back. DRY_RUN=1 runs the same steps on the CPU at toy sizes (no
# GPU needed; tests/test_device_scripts.py runs it).
# Usage: OUT=DIR [DRY_RUN=1] [PYTHON=python3] [MOELAB_CACHE=DIR] bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
: "${OUT:?set OUT to the folder the JSON goes to}"
PY=${PYTHON:-python3}
DRY=${DRY_RUN:-0}
TMP=$(mktemp -d)
LOG="$OUT/device_check.log"
STEPS="$TMP/steps.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MOELAB_CACHE=${MOELAB_CACHE:-$TMP/cache}
mkdir -p "$OUT"
: >"$LOG"

if [ "$DRY" = "1" ]; then
  PRESET=tests/fixtures/micro.toml STEPS_N=4 GPU=cpu CPU_THREADS=1
  TESTS=(tests/test_experts.py tests/test_device.py) BENCH=(--device cpu --configs toy --rounds 1 --no-hf)
else
  PRESET=tiny STEPS_N=200 GPU=cuda CPU_THREADS=8
  TESTS=(tests) BENCH=(--device cuda --configs A B A_T256 --rounds 5)
fi

# step NAME SECONDS CMD...: run CMD under a time limit, output to the log, "NAME rc s" to $STEPS
step() {
  local name=$1 limit=$2 t0 rc ms
  shift 2
  t0=$(date +%s%N)
  echo "== $name: $*" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  printf '%s %d %d.%03d\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) >>"$STEPS"
  echo "== $name: exit $rc" >>"$LOG"
  return 0
}

# curve NAME DEVICE DTYPE THREADS: the command of one training curve of $PRESET, in CURVE
curve() {
  CURVE=("$PY" benchmarks/train_curve.py run --preset "$PRESET" --steps "$STEPS_N" --device "$2"
    --dtype "$3" --threads "$4" --run-dir "$TMP/$1" --out "$TMP/$1.json")
}

# 0. the tokenizer and token caches, once, before the runs that share them
step data 90 "$PY" -c "import sys; from moelab.runconfig import load_run_config
from moelab.data import load_corpus; load_corpus(load_run_config(sys.argv[1]).data)" "$PRESET"

# 2a. the CPU reference curve, in the background while the GPU steps run
curve cpu cpu fp32 "$CPU_THREADS"
step tiny_cpu 360 "${CURVE[@]}" &
CPU_PID=$!

# 1. the cuda tests (skipped without CUDA; the dry run collects a few files only)
step cuda_tests 130 "$PY" -m pytest -q -m cuda -p no:cacheprovider --junitxml="$TMP/junit.xml" "${TESTS[@]}"
"$PY" scripts/device_report.py junit "$TMP/junit.xml" "$OUT/cuda_tests.json"

# 2b. the same curve on the GPU in fp32 and bf16
curve gpu_fp32 "$GPU" fp32 1
step tiny_gpu_fp32 60 "${CURVE[@]}"
curve gpu_bf16 "$GPU" bf16 1
step tiny_gpu_bf16 60 "${CURVE[@]}"

# 3. EP=2 over NCCL against one process, with two GPUs or more
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DRY" != "1" ] && [ "$NGPU" -ge 2 ]; then
  EP_SETS=(--set train.steps=20 --set train.log_every=1 --set train.eval_every=0 --set "train.device='cuda'")
  step ep1 45 "$PY" -m moelab train --config tests/fixtures/micro.toml --out "$TMP/ep1" --quiet "${EP_SETS[@]}"
  step ep2 60 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m moelab train \
    --config tests/fixtures/micro.toml --out "$TMP/ep2" --quiet "${EP_SETS[@]}" --set parallel.ep=2
  "$PY" scripts/device_report.py losses "$TMP/ep1" "$TMP/ep2" "$OUT/ep_nccl.json" --rtol 1e-4
else
  echo "{\"skipped\": \"EP=2 over NCCL needs 2 GPUs; this machine has $NGPU\"}" >"$OUT/ep_nccl.json"
fi

# 4. the layer benchmark on the device
step moe_layer 130 "$PY" benchmarks/moe_layer.py "${BENCH[@]}" --out "$OUT/moe_layer_cuda.json"

wait "$CPU_PID"
"$PY" benchmarks/train_curve.py compare "$TMP/cpu.json" "$TMP/gpu_fp32.json" "$TMP/gpu_bf16.json" \
  --out "$OUT/tiny_curves.json" >>"$LOG" 2>&1 ||
  echo '{"error": "a curve is missing; see device_check.log"}' >"$OUT/tiny_curves.json"
DRY_FLAG=()
if [ "$DRY" = "1" ]; then DRY_FLAG=(--dry-run); fi
"$PY" scripts/device_report.py steps "$STEPS" "$OUT/device_check.json" "${DRY_FLAG[@]}"
rm -rf "$TMP"
