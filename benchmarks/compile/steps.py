"""IST under torch.compile: compile counts over 50 steps and steady-state step time.

Each configuration runs in its own process (fresh dynamo caches; inductor's on-disk cache
may be warm), one after the other, on the same model, batch and seed; the parent prints one
markdown table and appends JSON lines to --out.

    OMP_NUM_THREADS=1 flock /tmp/cpu-timing.lock python -m benchmarks.compile

Configurations (every one compiles with inductor, torch.compile's default backend):
    lora_all        LoRA on every layer, AdamW, blocks compiled with compile_blocks(model)
    floor           same adapters, requires_grad set by hand on the SAME active sets that
                    ISTOptimizer(sampling="uniform", seed) draws (replayed), the same
                    BackwardCut set by hand, AdamW, blocks compiled with compile_blocks(model)
    ist             ISTOptimizer(sampling="uniform", seed) + compile_blocks(optimizer)
    ist_importance  ISTOptimizer (paper sampling, importance rounds every 10 steps) +
                    compile_blocks(optimizer); its step time excludes the round steps
    lora_all_whole  (opt-in) torch.compile(model) of LoRA on every layer
    ist_whole       (opt-in) torch.compile(model) with ISTOptimizer(sampling="uniform"): the
                    recompilation storm of issue 12 (the optimizer is built on the
                    uncompiled model, so its whole-model check cannot see the compile)

Compile counts: torch._dynamo.utils.counters["stats"]["unique_graphs"] after 25 and after
50 steps, and whether dynamo logged that it hit its recompile limit (then it runs eager).
Step time: median wall (perf_counter) and CPU (process_time) time of steps 26-50, round
steps excluded; round_ms: mean extra wall time of the steps that ran an importance round.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from ..benchkit.isolated import ROOT, run_isolated
from ..benchkit.models import llama_config, random_llama

PRESETS = {
    "tiny": dict(layers=8, hidden=64, inter=172, heads=4, kv=4, vocab=1024, batch=4, seq=128,
                 rank=8),
    "cpu-small": dict(layers=8, hidden=256, inter=688, heads=8, kv=8, vocab=2048, batch=4,
                      seq=128, rank=16),
}
CONFIGS = ["lora_all", "floor", "ist", "ist_importance"]
OPT_IN = ["lora_all_whole", "ist_whole"]
STEPS, HALF = 50, 25


class _LimitHits(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "recompile_limit" in record.getMessage():
            self.hits += 1


def build_model(cfg: dict) -> torch.nn.Module:
    """The preset's random Llama (seed 0, no KV cache) with LoRA on
    :data:`benchmarks.benchkit.models.LORA_TARGETS`."""
    config = llama_config(cfg["layers"], cfg["hidden"], intermediate=cfg["inter"],
                          heads=cfg["heads"], kv_heads=cfg["kv"], vocab=cfg["vocab"],
                          max_positions=max(cfg["seq"], 128), use_cache=False)
    return random_llama(config, seed=0, lora_rank=cfg["rank"])


def run_one(name: str, cfg: dict, active_frac: float, seed: int,
            backend: str = "inductor") -> dict:
    from torch._dynamo.utils import counters

    from ist_optim import BackwardCut, ISTOptimizer, compile_blocks, resolve_count, sample_layers

    limit_hits = _LimitHits()
    logging.getLogger("torch._dynamo").addHandler(limit_hits)
    model = build_model(cfg)
    model.train()
    blocks = list(model.base_model.model.model.layers)
    active = resolve_count(active_frac, len(blocks), "active")
    forward = model
    lora = [[p for n, p in b.named_parameters() if "lora_" in n] for b in blocks]
    set_floor = None
    if name.startswith("lora_all"):
        active = len(blocks)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    elif name == "floor":
        opt = torch.optim.AdamW([p for group in lora for p in group], lr=1e-4)
        gen = torch.Generator().manual_seed(seed)
        cut = BackwardCut(blocks, model=model)

        def set_floor() -> list[int]:  # the sets ISTOptimizer(sampling="uniform", seed) draws
            chosen = sorted(sample_layers(torch.ones(len(blocks)), active, gen))
            for i, params in enumerate(lora):
                for p in params:
                    p.requires_grad_(i in chosen)
            cut.set_active(chosen)
            return chosen
    else:
        sampling = "importance" if name == "ist_importance" else "uniform"
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-4, active_layers=active, seed=seed,
                           sampling=sampling, state_policy="keep")
    if name.endswith("_whole"):
        forward = torch.compile(model, backend=backend)
    else:
        compile_blocks(opt if isinstance(opt, ISTOptimizer) else model, backend=backend)
    current = set_floor() if set_floor is not None else None
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
    walls, cpus, round_walls, sets, graphs = [], [], [], [], {}
    start_all = time.perf_counter()
    for step in range(1, STEPS + 1):
        if isinstance(opt, ISTOptimizer):
            current = opt.active_layers
        sets.append(current if current is not None else list(range(len(blocks))))
        wall, cpu = time.perf_counter(), time.process_time()
        forward(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if set_floor is not None:
            current = set_floor()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if step in (HALF, STEPS):
            graphs[step] = counters["stats"]["unique_graphs"]
        if step > HALF:
            ran_round = (isinstance(opt, ISTOptimizer) and opt.runs_importance_rounds
                         and step % opt.update_interval == 0)
            if ran_round:
                round_walls.append(wall)
            else:
                walls.append(wall)
                cpus.append(cpu)
    step_ms = 1e3 * statistics.median(walls)
    return {
        "config": name, "active_layers": active, "layers": len(blocks),
        "graphs_25": graphs[HALF], "graphs_50": graphs[STEPS],
        "hit_recompile_limit": limit_hits.hits > 0,
        "step_ms": step_ms, "cpu_ms": 1e3 * statistics.median(cpus),
        "round_ms": (1e3 * statistics.mean(round_walls) - step_ms) if round_walls else None,
        "total_s": time.perf_counter() - start_all, "sets": sets,
    }


def _table(rows: list[dict]) -> str:
    by = {r["config"]: r for r in rows}
    ref = by.get("floor", {}).get("step_ms")
    ref_cpu = by.get("floor", {}).get("cpu_ms")
    lines = ["| config | active | graphs after 25 / 50 steps | recompile limit hit | "
             "ms/step (wall) | ms/step (CPU) | x floor (wall / CPU) | round ms | "
             "50 steps incl. compile (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = (f"{r['step_ms'] / ref:.2f} / {r['cpu_ms'] / ref_cpu:.2f}"
                 if ref and ref_cpu else "-")
        round_ms = f"{r['round_ms']:.0f}" if r["round_ms"] is not None else "-"
        lines.append(
            f"| {r['config']} | {r['active_layers']}/{r['layers']} | {r['graphs_25']} / "
            f"{r['graphs_50']} | {'yes' if r['hit_recompile_limit'] else 'no'} | "
            f"{r['step_ms']:.1f} | {r['cpu_ms']:.1f} | {ratio} | {round_ms} | "
            f"{r['total_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated; also {', '.join(OPT_IN)}")
    parser.add_argument("--active", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/compile/compile.jsonl")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = PRESETS[args.preset]
    if args.run:
        print(json.dumps(run_one(args.run, cfg, args.active, args.seed, args.backend)))
        return
    rows = []
    for name in args.configs.split(","):
        row = run_isolated("benchmarks.compile", [
            "--preset", args.preset, "--active", str(args.active), "--seed", str(args.seed),
            "--backend", args.backend, "--run", name])
        if row is None:
            continue
        rows.append(row)
        print(f"done {name}: {rows[-1]['step_ms']:.1f} ms/step, graphs "
              f"{rows[-1]['graphs_50']}", file=sys.stderr, flush=True)
    by = {r["config"]: r for r in rows}
    same_sets = ("floor" in by and "ist" in by and by["floor"]["sets"] == by["ist"]["sets"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(dict(row, preset=args.preset, torch=torch.__version__,
                                    backend=args.backend,
                                    floor_ist_same_sets=same_sets)) + "\n")
    print(f"\npreset {args.preset}, backend {args.backend}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); floor and ist trained the same active sets: "
          f"{same_sets}\n")
    print(_table(rows))

