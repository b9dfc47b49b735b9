"""Cost of the ways to run IST under DDP, side by side in one run (CPU, gloo).

Modes (each its own model copy, DDP wrapper and optimizer; timed in interleaved blocks so
machine noise hits every mode alike):

* ``ddp_all``: plain AdamW on every layer, DDP defaults (the baseline, no IST).
* ``ddp_all_find_unused``: the same with ``find_unused_parameters=True`` (what that flag
  alone costs).
* ``ist_freeze_find_unused``: ISTOptimizer ``freeze_inactive=True`` (default) and
  ``DistributedDataParallel(find_unused_parameters=True)`` (the recommended set-up and the
  HF Trainer's default): inactive layers get no weight gradients.
* ``ist_nofreeze``: ISTOptimizer ``freeze_inactive=False`` with DDP defaults: every
  layer's gradient is computed and all-reduced, the inactive ones are dropped.
* ``ist_freeze_skip_buckets``: as ``ist_freeze_find_unused`` plus
  ``ist_optim.distributed.skip_inactive_buckets`` (buckets of inactive layers are not
  all-reduced).

Every DDP wrapper uses ``--bucket-mb`` (DDP's default 25 MB).

Run (2 processes)::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m benchmarks.ddp

Rank 0 prints a Markdown table: median ms per step over the blocks, the ratio to
``ddp_all``, and the MB DDP all-reduces per step (counted by a communication hook that
wraps DDP's default all-reduce hook).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ist_optim import ISTOptimizer
from ist_optim.distributed import skip_inactive_buckets

from ..benchkit.models import llama_config, random_llama

MODES = ("ddp_all", "ddp_all_find_unused", "ist_freeze_find_unused", "ist_nofreeze",
         "ist_freeze_skip_buckets")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The random Llama of the command line (seed 0), with LoRA r8 on every linear layer
    (seeded 1) under ``--lora``."""
    config = llama_config(args.layers, args.hidden, heads=4, kv_heads=4, vocab=args.vocab,
                          max_positions=args.seq)
    return random_llama(config, seed=0, lora_rank=8 if args.lora else None, lora_alpha=8,
                        lora_targets="all-linear", lora_seed=1)


def count_bytes(ddp: DistributedDataParallel, opt: torch.optim.Optimizer,
                skip: bool) -> dict[str, int]:
    """Register a comm hook on ``ddp`` that counts the bytes it all-reduces (with ``skip``,
    around ``skip_inactive_buckets``' decision)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    counter = {"bytes": 0}
    real = default_hooks.allreduce_hook

    def counting(group, bucket):  # no annotations: DDP checks them
        counter["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
        return real(group, bucket)

    if skip:
        default_hooks.allreduce_hook = counting  # what skip_inactive_buckets imports
        try:
            skip_inactive_buckets(ddp, opt)
        finally:
            default_hooks.allreduce_hook = real
    else:
        ddp.register_comm_hook(None, lambda _state, bucket: counting(None, bucket))
    return counter


def build(mode: str, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(args)
    ist = dict(lr=1e-4, active_layers=args.active, update_interval=10, seed=0)
    ddp = dict(bucket_cap_mb=args.bucket_mb)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if mode == "ddp_all":
        return DistributedDataParallel(model, **ddp), torch.optim.AdamW(trainable, lr=1e-4)
    if mode == "ddp_all_find_unused":
        wrapped = DistributedDataParallel(model, find_unused_parameters=True, **ddp)
        return wrapped, torch.optim.AdamW(trainable, lr=1e-4)
    if mode in ("ist_freeze_find_unused", "ist_freeze_skip_buckets"):
        opt = ISTOptimizer(torch.optim.AdamW, model, **ist)
        return DistributedDataParallel(model, find_unused_parameters=True, **ddp), opt
    if mode == "ist_nofreeze":
        opt = ISTOptimizer(torch.optim.AdamW, model, freeze_inactive=False, **ist)
        return DistributedDataParallel(model, **ddp), opt
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def run_block(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int,
              batches: list[dict[str, torch.Tensor]]) -> float:
    dist.barrier()
    start = time.perf_counter()
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad()
    dist.barrier()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ddp",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--active", type=int, default=2, help="IST active layers")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per mode")
    parser.add_argument("--lora", action="store_true", help="LoRA r=8 instead of full FT")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket_cap_mb")
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    runs = {mode: build(mode, args) for mode in MODES}
    counters = {mode: count_bytes(model, opt, mode == "ist_freeze_skip_buckets")
                for mode, (model, opt) in runs.items()}
    for model, opt in runs.values():  # warm-up (and IST's first, all-layer step)
        run_block(model, opt, 2, batches)
    for counter in counters.values():
        counter["bytes"] = 0
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.blocks):
        for mode, (model, opt) in runs.items():
            times[mode].append(run_block(model, opt, args.steps, batches))
    if rank == 0:
        kind = "LoRA r=8" if args.lora else "full fine-tuning"
        print(f"{kind}, {args.layers} layers, hidden {args.hidden}, seq {args.seq}, "
              f"batch {args.batch}/rank, {dist.get_world_size()} ranks, IST "
              f"{args.active}/{args.layers} layers; median of {args.blocks} blocks of "
              f"{args.steps} steps, bucket_cap_mb {args.bucket_mb}\n")
        print("| mode | ms/step | vs ddp_all | MB all-reduced/step |\n| --- | ---: | ---: | ---: |")
        base = statistics.median(times["ddp_all"])
        for mode in MODES:
            median = statistics.median(times[mode])
            megabytes = counters[mode]["bytes"] / (args.blocks * args.steps) / 2**20
            print(f"| {mode} | {1000 * median:.1f} | {median / base:.2f} | {megabytes:.2f} |")
    dist.destroy_process_group()

