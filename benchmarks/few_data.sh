#!/usr/bin/env bash
# The few-data, several-epoch benchmark of docs/benchmarks.md, one process at a time:
# first LoRA, LoRA + IST and full + IST (sweep on seed 0, then seeds 1 and 2), then the two
# IST variants, all appended to one JSONL file (a rerun resumes where it stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/few_data
mkdir -p "$OUT"
run() {
  PYTHONPATH="$PWD" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 flock /tmp/cpu-timing.lock nice -n 10 \
    "$PY" benchmarks/few_data.py --out "$OUT/runs.jsonl" --table "$OUT/few_data.md" \
    --plot "$OUT/curves.png" "$@"
}
run --methods lora lora+ist full+ist
run --methods lora lora+ist full+ist lora+ist-first-order lora+uniform
