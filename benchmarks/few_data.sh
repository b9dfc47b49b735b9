#!/usr/bin/env bash
# The few-data, several-epoch benchmark of docs/benchmarks.md, one process at a time:
# first LoRA, LoRA + IST (3 learning rates each) and full + IST (2) swept on seed 0, then
# seeds 1 and 2 at the chosen rates; then LoRA + IST first-order and LoRA + uniform at the
# rate chosen for LoRA + IST, seeds 0-2. All runs append to one JSONL file (a rerun resumes
# where it stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/few_data
mkdir -p "$OUT"
run() {
  PYTHONPATH="$PWD" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 flock /tmp/cpu-timing.lock \
    nice -n 10 "$PY" benchmarks/few_data.py --out "$OUT/runs.jsonl" \
    --table "$OUT/few_data.md" --plot "$OUT/curves.png" \
    --lrs lora=3e-4,1e-3,3e-3 --lrs lora+ist=3e-4,1e-3,3e-3 "$@"
}
run --methods lora lora+ist full+ist
run --methods lora lora+ist full+ist lora+ist-first-order lora+uniform \
    --same-lr-as lora+ist-first-order=lora+ist --same-lr-as lora+uniform=lora+ist
