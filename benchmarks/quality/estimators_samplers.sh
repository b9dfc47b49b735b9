#!/usr/bin/env bash
# The estimator x sampler comparison of docs/benchmarks.md ("Estimators and depth-aware
# sampling on SmolLM2-135M"): one process per seed, in parallel, then one table.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=benchmarks/results/quality/estimators-samplers
mkdir -p "$OUT"
STEPS=${STEPS:-30}
METHODS=(
  --add-method 'lora+ist-normalized=lora:ist:{"estimator": "normalized"}'
  --add-method 'lora+ist-first-order=lora:ist:{"estimator": "first-order"}'
  --add-method 'lora+ist-depth=lora:ist:{"sampling": "depth-aware"}'
  --add-method 'lora+ist-normalized-depth=lora:ist:{"estimator": "normalized", "sampling": "depth-aware"}'
  --add-method 'lora+ist-first-order-depth=lora:ist:{"estimator": "first-order", "sampling": "depth-aware"}'
)
NAMES=(lora lora+uniform lora+ist lora+ist-normalized lora+ist-first-order lora+ist-depth
       lora+ist-normalized-depth lora+ist-first-order-depth)
for seed in ${SEEDS:-0 1 2}; do
  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.quality --seeds "$seed" \
    --steps "$STEPS" --batch-size 4 --seq-len 64 --eval-every 10 --eval-batches 4 \
    "${METHODS[@]}" --methods "${NAMES[@]}" \
    --out "$OUT/quality-seed$seed.jsonl" --table "$OUT/quality-seed$seed.md" \
    > "$OUT/log-seed$seed.txt" 2>&1 &
done
wait
.venv/bin/python -m benchmarks.quality --report "$OUT"/quality-seed*.jsonl --table "$OUT/quality.md"
