#!/usr/bin/env bash
# One command checks every GPU path: the tests marked `cuda`, then benchmarks/memory.py
# --preset 7b --device cuda and benchmarks/budget.py's GPU mode, results in gpu-results/
# (results.jsonl + summary.md + log.txt), in under 8 minutes on one H200-class GPU.
# Without a CUDA device (or with --dry) it runs a dry mode on the CPU (tiny shapes, CUDA
# tests skipped). No network: wheels carried in .whl/ (bitsandbytes, badam) are installed
# with pip --no-index into a temporary folder; nothing else is installed.
#   bash scripts/gpu-check.sh [--dry] [--out DIR] [--total-timeout SECONDS] ...
# Python: $PYTHON, else .venv/bin/python, else python3 (the GPU machine's has torch).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
