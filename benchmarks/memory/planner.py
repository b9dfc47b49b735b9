"""Predicted vs measured peak memory: ``estimate_peak_memory`` against the H200 anchors.

The measured column is the peak allocated GPU memory of shared/bench/gpu_anchor.py on one
H200 (LLaMA-2-7B shape, bf16, batch 8 x 512; raw lines in shared/bench/*.jsonl), copied
into ``benchkit/memory_anchors.py`` as data (tests/test_memory_estimate.py holds the same
rows; tests/benchmarks/test_benchkit.py checks that the two agree). The predicted column is computed
here from the config alone, on CPU. Also prints the predicted-vs-accounted comparison for
small random Llamas trained on this CPU (``account_step``, exact tensor bytes).

Run::

    python -m benchmarks.memory.planner
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig

from ist_optim import MemoryPlanner, estimate_peak_memory

from ..benchkit.memory_anchors import CPU_CASES, H200, LLAMA2_7B, accounted_step


def main() -> None:
    """Print the two tables."""
    started = time.process_time()
    config = LlamaConfig(**LLAMA2_7B)
    common = dict(batch_size=8, seq_len=512, dtype=torch.bfloat16)
    planners = {
        "lora": MemoryPlanner(config, method="lora", lora_rank=32, **common),
        "full": MemoryPlanner(config, method="full", foreach=False, **common),
        "bnb8": MemoryPlanner(config, method="full", optimizer="adamw8bit", **common),
        "badam": MemoryPlanner(config, method="full", optimizer="adamw-fp32-master",
                               foreach=False, **common),
    }
    print(f"planners measured in {time.process_time() - started:.1f} s CPU\n")
    print("| H200 run | measured GiB | predicted GiB | error | peak at |")
    print("| --- | ---: | ---: | ---: | --- |")
    for row, measured, planner, kwargs in H200:
        est = planners[planner].estimate(**kwargs)
        print(f"| {row} | {measured:.2f} | {est.peak_gib:.2f} | "
              f"{100 * (est.peak_gib / measured - 1):+.1f}% | {est.phase} |")
    print("\n| CPU run (4 layers, hidden 128, batch 4 x 64, fp32) | accounted MiB | "
          "predicted MiB | error |")
    print("| --- | ---: | ---: | ---: |")
    small = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    for method, active, embeddings, head in CPU_CASES:
        measured = accounted_step(small, method, active, embeddings=embeddings, head=head)
        est = estimate_peak_memory(small, batch_size=4, seq_len=64, dtype=torch.float32,
                                   method=method, lora_rank=8, active_layers=active,
                                   train_embeddings=embeddings, train_head=head,
                                   foreach=False)
        label = f"{method}, layers {active}" + (", embeddings + head" if embeddings else "")
        print(f"| {label} | {measured.peak_bytes / 2**20:.2f} | {est.peak_bytes / 2**20:.2f} | "
              f"{100 * (est.peak_bytes / measured.peak_bytes - 1):+.1f}% |")


if __name__ == "__main__":
    main()
