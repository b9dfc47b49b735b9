#!/usr/bin/env bash
# The few-data, several-epoch benchmark of docs/benchmarks.md, one process at a time, most
# important runs first (so a run cut by the time limit still answers the main question):
#   1. LoRA and LoRA + IST: 3 learning rates each on seed 0, then seeds 1 and 2 at the rate
#      with the lowest validation loss at the last epoch;
#   2. full + IST: 2 rates on seed 0;
#   3. LoRA + IST first-order and LoRA + uniform: the same 3 rates each on seed 0;
#   4. the remaining seeds (1, 2) of full + IST and of the two IST variants, each at its own
#      chosen rate.
# All runs append to one JSONL file; a rerun skips the runs already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/few_data
mkdir -p "$OUT"
run() {
  PYTHONPATH="$PWD" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 flock /tmp/cpu-timing.lock \
    nice -n 10 "$PY" -m benchmarks.few_data --out "$OUT/runs.jsonl" \
    --table "$OUT/few_data.md" --plot "$OUT/curves.png" \
    --lrs lora=3e-4,1e-3,3e-3 --lrs lora+ist=3e-4,1e-3,3e-3 "$@"
}
ALL=(lora lora+ist full+ist lora+ist-first-order lora+uniform)
SWEEP=(--lrs lora+ist-first-order=3e-4,1e-3,3e-3 --lrs lora+uniform=3e-4,1e-3,3e-3)
run --methods lora lora+ist
run --methods lora lora+ist full+ist --seeds 0
run --methods "${ALL[@]}" "${SWEEP[@]}" --seeds 0
run --methods "${ALL[@]}" "${SWEEP[@]}"
