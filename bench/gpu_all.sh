#!/usr/bin/env bash
# Every GPU check of the project in ONE device call, under the device's rules (bench/gpu_all.py says which and how):
# at most 8 small files in $OUT, working data under /tmp, key figures on stdout as each step ends, a final
# `SUMMARY {...}` line, each step in its own session killed whole at its limit, total under 9 minutes with the
# bundle setup. Steps, most valuable first: training bench, serving bench, pipeline smoke, kernel checks.
#
#   on the GPU machine:  OUT=$OUT bash bench/gpu_all.sh              (one call, timeout_s 540, carry .device)
#   rehearsal on CPU:    bash bench/gpu_all.sh --dry-run              (the same steps with CPU settings, small sizes)
#
# The bundle (.device, or $GPU_ALL_BUNDLE) carries what the device image lacks; build it from the project's venv:
#   EXTRA_PACKAGES="$(cat bench/gpu_bundle_extras.txt)" PY=.venv/bin/python bash ../shared/device/bundle.sh .device
# Without it (non-dry run) the script prints the versions it found and fails at once.
set -uo pipefail
T0=$(date +%s)
DRY=()
[[ "${1:-}" == "--dry-run" ]] && DRY=(--dry-run)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$(mktemp -d /tmp/gpu-all-out.XXXXXX)}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu-all-work.XXXXXX)  # datasets, models, checkpoints, logs: never under $OUT
mkdir -p "$WORK/logs"
BUNDLE=${GPU_ALL_BUNDLE:-.device}
bundle="not needed (dry run)"
if [[ ${#DRY[@]} == 0 ]]; then
  if [[ ! -f "$BUNDLE/setup.sh" ]]; then
    bundle="missing ($BUNDLE/setup.sh not found)"
  elif source "$BUNDLE/setup.sh" > "$WORK/logs/setup.log" 2>&1; then
    bundle=ok
  else
    bundle="failed (setup.log in logs.tar.gz)"
  fi
fi
PY=${PY:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false
"$PY" bench/gpu_all.py "${DRY[@]}" --out "$OUT" --work "$WORK" --t0 "$T0" --bundle "$bundle"
status=$?
[[ -n "${KEEP_WORK:-}" ]] || rm -rf "$WORK"
exit $status
