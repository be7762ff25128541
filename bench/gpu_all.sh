#!/usr/bin/env bash
# Every GPU check of the project in ONE device call. Each step has its own timeout (total < 9 min, setup
# included); every figure and log goes under $OUT; a failing step does not stop the others.
#
#   on the GPU machine:  OUT=$OUT bash bench/gpu_all.sh
#   rehearsal on CPU:    bash bench/gpu_all.sh --dry-run      (the same steps with CPU settings and small sizes)
#
# Steps: (a) smoke of the whole pipeline (reformulate -> 3 stages -> export -> serve -> correct -> evaluate) on a
# small model with use_gpu, bf16, NCCL, local paths; (b) packed-equivalence and liger checks; (c) the training
# bench; (d) the serving bench (added by the serving engineer, see the marked place below).
set -uo pipefail
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$(mktemp -d /tmp/gpu-all.XXXXXX)}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false
# The device image has torch but not Ray/DeepSpeed: they come from the offline bundle (shared/ENVIRONMENT.md).
if [[ $DRY == 0 && -f .device/setup.sh ]]; then
  source .device/setup.sh > "$OUT/setup.log" 2>&1 || echo "bundle setup failed, see setup.log"
fi

if [[ $DRY == 1 ]]; then  # CPU: the same steps, small sizes; 2 CPU cores are slower, so the limits double
  MODE=(--cpu); BENCH=(--size smoke --workers 2); SCALE=2
else
  MODE=(--gpu); BENCH=(--size tinyllama --gpu --workers 1); SCALE=1
fi
status=0

step() {  # step NAME TIMEOUT_S COMMAND...: runs with its own timeout, logs to $OUT/NAME.log, records rc + seconds
  local name=$1 limit=$(( $2 * SCALE )) start rc
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"limit_s\": $limit}" >> "$OUT/steps.jsonl"
  echo "[$name] rc=$rc ($(( $(date +%s) - start ))s)"
  if [[ $rc -ne 0 ]]; then status=1; tail -n 25 "$OUT/$name.log"; fi
}

$PY - > "$OUT/device.json" 2>&1 <<'PYEOF'
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))
PYEOF

step a_pipeline_smoke 150 $PY bench/gpu_smoke.py "${MODE[@]}" --out "$OUT/smoke"
step b_kernel_checks 45 $PY bench/gpu_checks.py "${MODE[@]}" --out "$OUT/kernel_checks.json"
step c_train_bench 180 $PY bench/train_throughput.py "${BENCH[@]}" --out "$OUT/train_bench.json"
# ---- (d) serving bench: hf_static vs hf, same run, open-loop Poisson arrivals + the head-of-line case (90 s)
if [[ $DRY == 1 ]]; then  # CPU: the bench's tiny stop-early corrector
  SERVE=(--rates 1,2 --duration 6 --hol-long-tokens 256 --max-s 60)
else                      # GPU: TinyLlama-1.1B shape, random weights (never stops early), bf16
  SERVE=(--shape tinyllama --model /tmp/ma-tinyllama --device cuda --num-gpus 1 --num-cpus 4 --max-running 128
         --max-batch-size 64 --rates 16,128 --duration 8 --max-new-tokens 128,256 --hol-long-tokens 256 --max-s 30)
fi
step d_serve_bench 90 $PY bench/serve_load.py "${SERVE[@]}" --out "$OUT/serve_bench.json"
# ---- end of the serving step

echo "figures and logs: $OUT"
exit $status
