"""Step time of depth-aware sampling vs random (importance) sampling vs LoRA on all layers.

Backward cost is set by the lowest trained layer: with LoRA and ``freeze_inactive``, no
tensor below it requires grad, so autograd stops there (tests/test_depth_sampling.py checks
this). The configurations run interleaved, one step each in turn (rotating who goes
first), so machine load hits all alike; medians over the timed steps are reported side
by side (the time column as the median over steps of each configuration's time over LoRA
on all layers' time in the same cycle). Because the machine's load varies, the forward +
backward FLOPs of each timed step are also counted (untimed, same batch, same active set,
``torch.utils.flop_counter``): a load-independent measure of the saved work. Importance
rounds are excluded (``update_interval`` beyond the run) to time
the sampling alone; their cost is measured by benchmarks/importance/first_order_agreement.py.

Run (the configuration of docs/benchmarks.md)::

    OMP_NUM_THREADS=1 python -m benchmarks.importance.depth_sampling --layers 12 --hidden 256 \
        --seq 128 --batch 4 --steps 30
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ist_optim import ISTOptimizer

from ..benchkit.data import random_batch, shakespeare_bytes
from ..benchkit.models import llama_config, random_llama, shape_parser


def main() -> None:
    parser = shape_parser(__doc__, layers=12, batch=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--active", type=float, default=0.25)
    args = parser.parse_args()

    tokens = shakespeare_bytes()
    configs = {}
    for name in ("lora-all-layers", "ist-random", "ist-depth-aware"):
        model = random_llama(llama_config(args.layers, args.hidden), lora_rank=8)
        if name == "lora-all-layers":
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        else:
            sampling = "depth-aware" if name == "ist-depth-aware" else "importance"
            opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, sampling=sampling,
                               active_layers=args.active, update_interval=10**9, seed=0)
        configs[name] = {"model": model, "opt": opt, "times": [], "lowest": [], "flops": []}

    gen = torch.Generator().manual_seed(0)
    for step in range(args.warmup + args.steps):
        batch = random_batch(tokens, args.batch, args.seq, gen)
        names = list(configs)
        for name in names[step % len(names):] + names[: step % len(names)]:  # rotate order
            cfg = configs[name]
            opt, model = cfg["opt"], cfg["model"]
            lowest = min(opt.active_layers) if isinstance(opt, ISTOptimizer) else 0
            if step >= args.warmup:  # untimed FLOP count of the same work, no update
                with FlopCounterMode(display=False) as counter:
                    model(**batch).loss.backward()
                opt.zero_grad()
                cfg["flops"].append(counter.get_total_flops())
            start = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                cfg["times"].append(elapsed)
                cfg["lowest"].append(lowest)

    base = configs["lora-all-layers"]
    print(f"Llama {args.layers} layers x hidden {args.hidden}, LoRA r8 on q,k,v,up,down, "
          f"batch {args.batch} x seq {args.seq}, active {args.active}, "
          f"{args.steps} timed steps, torch threads {torch.get_num_threads()}")
    print("| configuration | median step (ms) | step vs LoRA all layers (median of per-step "
          "ratios) | GFLOP per step (forward + backward) | FLOPs vs LoRA all layers | mean "
          "lowest active layer |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, cfg in configs.items():
        ratios = [t / b for t, b in zip(cfg["times"], base["times"], strict=True)]
        flops = statistics.mean(cfg["flops"])
        print(f"| {name} | {1000 * statistics.median(cfg['times']):.1f} | "
              f"{statistics.median(ratios):.3f} | {flops / 1e9:.2f} | "
              f"{flops / statistics.mean(base['flops']):.3f} | "
              f"{statistics.mean(cfg['lowest']):.2f} |")


if __name__ == "__main__":
    main()
