#!/usr/bin/env bash
# One command checks every GPU path: the tests marked `cuda`, then `python -m benchmarks.memory
# --preset 7b --device cuda` and `python -m benchmarks.budget`'s GPU mode on a random-init model,
# results in gpu-results/ (summary.md with one verdict line per part, results.jsonl,
# log.txt), within 8 minutes on one H100/H200. Without a CUDA device (or with --dry) it
# runs a dry mode on the CPU (tiny shapes, CUDA tests collected and skipped). No network:
# the wheels carried in .whl/ (bash scripts/gpu-wheels.sh: bitsandbytes, badam) are
# installed with pip --no-index into a temporary folder; nothing else is installed.
#   bash scripts/gpu-check.sh [--dry] [--out DIR] [--total-timeout SECONDS] ...
# Python: $PYTHON, else .venv/bin/python, else python3 (the GPU machine's has torch).
# The whole run is killed after $GPU_CHECK_HARD_LIMIT seconds (default 470); the summary
# then still holds a verdict line per part (those not reached: "not run").
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=gpu-results
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [ "${args[$i]}" = "--out" ] && [ $((i + 1)) -lt ${#args[@]} ]; then OUT="${args[$((i + 1))]}"; fi
done
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
LIMIT="${GPU_CHECK_HARD_LIMIT:-470}"
timeout --kill-after=10 "$LIMIT" "$PY" -m benchmarks.gpu "$@"
code=$?
if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
    mkdir -p "$OUT"
    printf '\nFAIL gpu-check: killed by scripts/gpu-check.sh after %s s (GPU_CHECK_HARD_LIMIT); the verdicts above are those written before\n' \
        "$LIMIT" | tee -a "$OUT/summary.md"
fi
exit "$code"
