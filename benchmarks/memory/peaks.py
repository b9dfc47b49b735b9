"""Memory and speed of IST against hand-frozen floors and BAdam, side by side in one run.

Each configuration runs in its own process (so peak memory is its own) on the same model
shape, data and seed; the parent prints one markdown table and writes JSON lines.

    python -m benchmarks.memory --preset cpu-small            # CPU, ~2 minutes
    python -m benchmarks.memory --preset 7b --device cuda     # one GPU, LLaMA-2-7B shape

Configurations:
    lora_all       LoRA in every layer, plain AdamW
    floor          same adapters, requires_grad set by hand on the SAME active sets that
                   ISTOptimizer(sampling="uniform") draws (replayed), plain AdamW
    ist_uniform    ISTOptimizer, uniform sampling (LISA-style), no importance rounds
    ist_keep / ist_offload / ist_drop   ISTOptimizer (paper sampling + rounds), state policy
    full_adamw     full fine-tuning, AdamW, all layers
    ist_full_offload   full fine-tuning of the blocks with ISTOptimizer (1 of 16 blocks per
                   step, embeddings and head frozen as in BAdam), state_policy="offload"
    badam          BAdam BlockOptimizer (pip badam), full fine-tuning, one block at a time
Step time is the median over timed steps that ran no importance round; the round cost is
the mean extra time of steps that ran one. Peak memory: torch.cuda.max_memory_allocated on
CUDA; on CPU the growth of the process's peak RSS over its RSS after building the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ist_optim.memory import PeakMemory

from ..benchkit.isolated import ROOT, run_isolated
from ..benchkit.models import llama_config, random_llama

PRESETS = {
    "tiny": dict(layers=4, hidden=64, inter=128, heads=4, kv=4, vocab=256, batch=2, seq=32,
                 rank=4, steps=2, warmup=1, dtype="float32"),  # scripts/gpu-check.sh --dry
    "cpu-small": dict(layers=8, hidden=256, inter=688, heads=8, kv=8, vocab=2048, batch=4,
                      seq=128, rank=16, steps=24, warmup=3, dtype="float32"),
    "7b": dict(layers=32, hidden=4096, inter=11008, heads=32, kv=32, vocab=32000, batch=8,
               seq=512, rank=32, steps=5, warmup=2, dtype="bfloat16"),
}
CONFIGS = ["lora_all", "floor", "ist_uniform", "ist_keep", "ist_offload", "ist_drop",
           "full_adamw", "ist_full_offload", "badam"]


def build_model(cfg: dict, peft: bool, device: str) -> torch.nn.Module:
    """The preset's random Llama (seed 0) in its dtype on ``device``, with LoRA on
    :data:`benchmarks.benchkit.models.LORA_TARGETS` when ``peft``."""
    config = llama_config(cfg["layers"], cfg["hidden"], intermediate=cfg["inter"],
                          heads=cfg["heads"], kv_heads=cfg["kv"], vocab=cfg["vocab"],
                          max_positions=max(cfg["seq"], 128))
    return random_llama(config, seed=0, dtype=getattr(torch, cfg["dtype"]), device=device,
                        lora_rank=cfg["rank"] if peft else None)


def peak_of(meter: PeakMemory) -> int:
    """A configuration's peak as the table reports it: the allocator's peak on CUDA, the
    growth of the process's peak RSS over its RSS at the reset (after the model is built)
    on the CPU."""
    return meter.peak_bytes() if meter.cuda else meter.growth_bytes()


def make_optimizer(name: str, model, cfg: dict, active: int, seed: int):
    from ist_optim import ISTOptimizer

    lr = 1e-4
    if name in ("lora_all", "floor", "full_adamw"):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if name == "badam":
        from badam import BlockOptimizer

        base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        return BlockOptimizer(base, list(model.named_parameters()), switch_block_every=50,
                              switch_mode="random", verbose=0)
    sampling = "uniform" if name == "ist_uniform" else "importance"
    policy = {"ist_keep": "keep", "ist_drop": "drop"}.get(name, "offload")
    if name == "ist_uniform":
        policy = "offload" if next(model.parameters()).is_cuda else "keep"
    return ISTOptimizer(torch.optim.AdamW, model, lr=lr, active_layers=active, seed=seed,
                        sampling=sampling, state_policy=policy)


def run_one(name: str, cfg: dict, device: str, active_frac: float, seed: int) -> dict:
    from ist_optim import ISTOptimizer, resolve_count, sample_layers, state_bytes

    peft = not name.startswith(("full", "ist_full", "badam"))
    model = build_model(cfg, peft, device)
    model.train()
    layers = list((model.base_model.model if peft else model).model.layers)
    active = resolve_count(active_frac, len(layers), "active")
    if name == "ist_full_offload":  # LISA/BAdam-like: few blocks, embeddings and head frozen
        active = max(1, len(layers) // 16)
        model.get_input_embeddings().requires_grad_(False)
        model.get_output_embeddings().requires_grad_(False)
    elif name == "full_adamw" or name == "lora_all":
        active = len(layers)
    elif name == "badam":
        active = 1
    opt = make_optimizer(name, model, cfg, active, seed)
    floor_gen = torch.Generator().manual_seed(seed)
    floor_params = [[p for n, p in b.named_parameters() if "lora_" in n] for b in layers]

    def floor_set() -> None:  # the sets ISTOptimizer(sampling="uniform", seed) draws
        chosen = set(sample_layers(torch.ones(len(layers)), active, floor_gen))
        for i, params in enumerate(floor_params):
            for p in params:
                p.requires_grad_(i in chosen)

    if name == "floor":
        floor_set()
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g).to(device)
    meter = PeakMemory(device)  # the model's device: cuda:1 measures cuda:1
    meter.reset()
    times, round_steps, state_peak = [], [], 0
    interval = getattr(opt, "update_interval", 0) if isinstance(opt, ISTOptimizer) else 0
    for step in range(cfg["warmup"] + cfg["steps"]):
        meter.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if name == "floor":
            floor_set()
        meter.synchronize()
        elapsed = time.perf_counter() - start
        inner = opt.optimizer if isinstance(opt, ISTOptimizer) else getattr(
            opt, "base_optimizer", opt)
        state_peak = max(state_peak, state_bytes(inner.state.values()))
        if step >= cfg["warmup"]:
            ran_round = bool(interval) and opt.runs_importance_rounds and (
                opt.num_steps % interval == 0)
            (round_steps if ran_round else times).append(elapsed)
    median = statistics.median(times)
    peak = peak_of(meter)
    return {
        "config": name, "device": device, "step_ms": 1e3 * median,
        "round_ms": 1e3 * (statistics.mean(round_steps) - median) if round_steps else None,
        "peak_bytes": peak, "state_bytes": state_peak, "active_layers": active,
        "layers": len(layers), "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--active", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="override the preset's timed steps")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/memory/memory.jsonl")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = dict(PRESETS[args.preset])
    if args.steps:
        cfg["steps"] = args.steps
    if args.run:
        print(json.dumps(run_one(args.run, cfg, args.device, args.active, args.seed)))
        return
    rows = []
    steps = ["--steps", str(args.steps)] if args.steps else []
    for name in args.configs.split(","):
        row = run_isolated("benchmarks.memory", [
            "--preset", args.preset, "--device", args.device, "--active", str(args.active),
            "--seed", str(args.seed), *steps, "--run", name], tail=2000)
        if row is None:
            continue
        rows.append(row)
        print(f"done {name}: {rows[-1]['step_ms']:.0f} ms/step", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(dict(row, preset=args.preset)) + "\n")
    by = {r["config"]: r for r in rows}
    ref_t = by.get("floor", {}).get("step_ms")
    print(f"\npreset {args.preset}, device {args.device}, torch {torch.__version__}\n")
    print("| config | active | peak MiB | state MiB | ms/step | x floor | round ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['step_ms'] / ref_t:.2f}" if ref_t else "-"
        rnd = f"{r['round_ms']:.0f}" if r["round_ms"] is not None else "-"
        print(f"| {r['config']} | {r['active_layers']}/{r['layers']} | "
              f"{r['peak_bytes'] / 2**20:.1f} | {r['state_bytes'] / 2**20:.2f} | "
              f"{r['step_ms']:.0f} | {ratio} | {rnd} |")

