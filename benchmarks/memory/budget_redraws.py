"""What ``memory_budget=`` decides on a 7B shape: predicted, from the config alone (CPU).

LLaMA-2-7B shape, bf16, batch 8 x 512, LoRA r32 on q, k, v, up, down, AdamW, 8 of 32
layers per step, optimizer state of inactive layers off the device, backward cut; budget
24 GiB. For 200 draws of each sampler (seed 0, uniform scores) it prints how many steps
need checkpointing, how many blocks, and the step's FLOPs (forward, backward,
recomputation) relative to LoRA on all layers without checkpointing, against
checkpointing every block in every step. These are the planner's predictions, not
measurements (see docs/memory.md for how the planner compares with the H200 runs).

A second table repeats the depth-aware draws with ``budget_redraws`` = 0, 2, 4, 8 (draw
again while the set does not fit without checkpointing): steps that checkpoint, blocks
per step, compute, how many times the least and the most drawn layer trained in the 200
steps, and the CPU time of the draws and the decision per step.

Run::

    OMP_NUM_THREADS=1 python -m benchmarks.memory.budget_redraws
"""

from __future__ import annotations

import time

from ist_optim import (
    CheckpointPolicy,
    ISTConfig,
    LayerSampler,
    MemoryPlanner,
    parse_memory_budget,
)
from ist_optim.memory import load_config


def main(budget: str = "24GiB", draws: int = 200) -> None:
    planner = MemoryPlanner(load_config("llama-2-7b"), batch_size=8, seq_len=512,
                            lora_rank=32)
    policy = CheckpointPolicy(planner, parse_memory_budget(budget))
    base = planner.estimate().flops
    gc_all = planner.estimate(gradient_checkpointing=True, cut_backward=False)
    print(f"LoRA all: {planner.estimate().peak_gib:.1f} GiB; LoRA all + GC: "
          f"{gc_all.peak_gib:.1f} GiB, {gc_all.flops / base:.2f}x")
    print("| sampling | steps checkpointing | blocks per step (mean, max) | max predicted GiB "
          "| compute, budget | compute, GC always + cut | decide ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for sampling in ("uniform", "depth-aware"):
        sampler = LayerSampler.from_config(ISTConfig(active_layers=8, sampling=sampling), 32, 0)
        steps = blocks = most = peak = flops = flops_gc = 0
        seconds = 0.0
        for _ in range(draws):
            active = sampler.draw_active()
            start = time.process_time()
            decision = policy.decide(active)
            seconds += time.process_time() - start
            steps += bool(decision.checkpointed)
            blocks += len(decision.checkpointed)
            most = max(most, len(decision.checkpointed))
            peak = max(peak, decision.peak_bytes)
            flops += planner.estimate(active, gradient_checkpointing=decision.checkpointed).flops
            flops_gc += planner.estimate(active, gradient_checkpointing=True).flops
        print(f"| {sampling} | {steps}/{draws} | {blocks / draws:.1f}, {most} | "
              f"{peak / 2**30:.2f} | {flops / draws / base:.2f}x | "
              f"{flops_gc / draws / base:.2f}x | {1000 * seconds / draws:.2f} |")
    print()
    redraw_rows(planner, policy, base, draws)


def redraw_rows(planner: MemoryPlanner, policy: CheckpointPolicy, base: float,
                draws: int) -> None:
    """Depth-aware draws with ``budget_redraws`` = 0, 2, 4, 8 (what ``ISTOptimizer`` does:
    ``draw_active(policy.fits_as_is, redraws)``, then ``policy.decide``)."""
    print("| budget_redraws | steps checkpointing | blocks per step (mean) | compute, budget "
          "| times a layer trained (least, most) | draw + decide ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for redraws in (0, 2, 4, 8):
        sampler = LayerSampler.from_config(ISTConfig(active_layers=8, sampling="depth-aware"),
                                           planner.num_layers, 0)
        counts = [0] * planner.num_layers
        steps = blocks = flops = 0
        seconds = 0.0
        for _ in range(draws):
            start = time.process_time()
            active = sampler.draw_active(policy.fits_as_is if redraws else None, redraws)
            decision = policy.decide(active)
            seconds += time.process_time() - start
            for layer in active:
                counts[layer] += 1
            steps += bool(decision.checkpointed)
            blocks += len(decision.checkpointed)
            flops += planner.estimate(active, gradient_checkpointing=decision.checkpointed).flops
        print(f"| {redraws} | {steps}/{draws} | {blocks / draws:.1f} | "
              f"{flops / draws / base:.2f}x | {min(counts)}, {max(counts)} | "
              f"{1000 * seconds / draws:.2f} |")


if __name__ == "__main__":
    main()
