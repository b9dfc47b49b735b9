"""``ist-finetune plan``: predicted peak memory and compute of the ways to fine-tune a model.

Everything is estimated from the model's config (:class:`ist_optim.memory.MemoryPlanner`,
on the ``meta`` device): no weights are loaded, nothing is downloaded, a 7B shape takes a
few seconds on a laptop CPU.

Rows whose active set is drawn anew (IST, one BAdam block) show the peak of the worst draw,
the one that puts the lowest trained layer at the bottom (it happens within a few steps,
so it is what the budget must hold), and the compute of an average draw (200 draws of the
library's own samplers with equal importance weights). Rows under ``memory_budget`` let
:class:`ist_optim.CheckpointPolicy` choose the checkpointed blocks of each draw for the
budget given, as ``ISTOptimizer(memory_budget=...)`` does: their peak is the largest
predicted over the draws, their compute the mean (recomputation included).

The QLoRA rows model a base whose block linears are NF4 with double quantization
(bitsandbytes) and everything else in ``--dtype``; peft's ``prepare_model_for_kbit_training``
casts embeddings, norms and head to float32, after which bitsandbytes computes in float32:
plan that with ``--dtype float32``. GaLore and APOLLO rows are full fine-tuning as the HF
Trainer sets them up (``optim="galore_adamw"`` / ``"apollo_adamw"`` with the blocks' linear
layers as ``optim_target_modules``), with gradient checkpointing (without it, full
fine-tuning's activations alone exceed a 24 GB card at 8 x 512 tokens), at the step that
recomputes the projectors; the
layer-wise rows (``optim="galore_adamw_layerwise"``, ...) update each parameter as its
gradient is accumulated and free the gradient at once.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import parse_bytes
from .errors import CLIError
from .parser import OneLineParser, positive_float, positive_int

if TYPE_CHECKING:
    from ..planner.roofline import Device

__all__ = ["APPROXIMATE_TIME_ROWS", "EVERY_LAYER_ROWS", "PLAN_ROWS", "PlanRow",
           "build_plan_parser", "fastest", "parse_budget", "plan", "plan_main"]

_DTYPES = ("bfloat16", "float16", "float32")
_DRAWS = 200

#: The configurations compared, in table order.
PLAN_ROWS: tuple[str, ...] = (
    "LoRA all", "LoRA all + GC", "IST random 25%", "IST depth-aware", "IST + GC + cut",
    "LoRA all, budget", "IST depth-aware, budget", "QLoRA + GC", "QLoRA + IST + GC + cut",
    "QLoRA + IST, budget", "full AdamW", "full IST + offload", "full AdamW8bit",
    "one block (BAdam)", "GaLore + GC", "APOLLO + GC", "APOLLO-Mini + GC",
    "GaLore layer-wise + GC", "APOLLO layer-wise + GC", "APOLLO-Mini layer-wise + GC")


def parse_budget(text: str) -> int:
    """``--budget`` in bytes: :func:`ist_optim.config.parse_bytes`, the rule of every size
    (a unit is required: ``24GiB``, ``80GB``; a bare ``24`` is refused, as
    ``memory_budget="24"`` is), its error as a one-line usage error.

    Example:
        >>> parse_budget("24GiB"), parse_budget("1.5 GB")
        (25769803776, 1500000000)
    """
    try:
        return parse_bytes(text, "--budget")
    except ValueError as err:
        raise CLIError(str(err)) from None


@dataclass(frozen=True)
class PlanRow:
    """One configuration of the plan: what trains, its predicted peak and compute."""

    name: str
    trains: str
    peak_bytes: int
    host_bytes: int
    flops: float
    fits: bool
    phase: str
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Plain types for ``--json``."""
        return {"configuration": self.name, "trains": self.trains,
                "peak_bytes": self.peak_bytes, "peak_gib": round(self.peak_bytes / 2**30, 2),
                "host_bytes": self.host_bytes, "flops_per_step": self.flops,
                "predicted_step_seconds": self.seconds,
                "step_time_approximate": self.name in APPROXIMATE_TIME_ROWS, "fits": self.fits,
                "peak_at": self.phase}


def build_plan_parser() -> argparse.ArgumentParser:
    """The parser of ``ist-finetune plan``."""
    from ..memory.shapes import SHAPES
    from ..planner.roofline import DEVICES

    p = OneLineParser(prog="ist-finetune plan",
                       description="Predict the peak GPU memory and the compute per step of "
                                   "LoRA, IST, full fine-tuning and BAdam for a model shape, "
                                   "from its config alone, and say which fits a budget.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"model directory, config.json, or a named shape: {sorted(SHAPES)}")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence")
    p.add_argument("--budget", default="24GiB",
                   help="device memory available: a number and a unit, e.g. 24GiB or 80GB")
    p.add_argument("--rank", type=positive_int, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=positive_float, default=None,
                   help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,up_proj,down_proj",
                   help="comma-separated linear layers that get adapters")
    p.add_argument("--active-layers", type=_count_or_fraction, default=0.25,
                   help="IST: layers trained per step, a count (2) or a fraction (0.25)")
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES,
                   help="weights and compute (QLoRA: all but the 4-bit block linears)")
    p.add_argument("--projection-rank", type=positive_int, default=None,
                   help="GaLore / APOLLO rank (default: the HF Trainer's 128; APOLLO-Mini 1)")
    p.add_argument("--device", default="h100", choices=sorted(DEVICES),
                   help="the GPU whose data-sheet rates price each row's step time")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _count_or_fraction(text: str) -> int | float:
    """``--active-layers`` read as ``ist-finetune`` reads it: ``"2"`` a layer count,
    ``"0.25"`` a fraction of the layers."""
    try:
        return int(text)
    except ValueError:
        return positive_float(text)


def _active_count(value: int | float, num_layers: int) -> int:
    """The layers IST trains per step: the sampler's own count (:func:`ist_optim.resolve_count`)."""
    from .. import resolve_count

    try:
        return resolve_count(value, num_layers, "--active-layers")
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None


@dataclass(frozen=True)
class _Cost:
    """A row's compute and predicted step time (the mean over its draws)."""

    flops: float
    seconds: float


def _cost(planner: Any, estimates: Sequence[Any], device: Device) -> _Cost:
    return _Cost(sum(e.flops for e in estimates) / len(estimates),
                 sum(planner.step_time(e, device).seconds for e in estimates)
                 / len(estimates))


def _mean(planner: Any, draws: Sequence[Sequence[int]], device: Device,
          **kwargs: Any) -> _Cost:
    return _cost(planner, [planner.estimate(list(d), **kwargs) for d in draws], device)


def _draws(num_layers: int, k: int, depth_aware: bool) -> list[list[int]]:
    import torch

    from ..sampling.draws import sample_depth_aware, sample_layers

    generator = torch.Generator().manual_seed(0)
    weights = torch.ones(num_layers)
    draw = sample_depth_aware if depth_aware else sample_layers
    return [draw(weights, k, generator) for _ in range(_DRAWS)]


def _budget_rows(planner: Any, budget: int, draws: Sequence[Sequence[int]], base: str,
                 share: str, device: Device) -> list[tuple[str, str, Any, _Cost]]:
    """LoRA on every layer and IST under ``memory_budget``: per draw the blocks
    :class:`ist_optim.CheckpointPolicy` checkpoints; the worst predicted peak, mean FLOPs."""
    from .. import CheckpointPolicy

    policy = CheckpointPolicy(planner, budget)
    n = planner.num_layers
    rows = []
    with warnings.catch_warnings():  # "nothing fits" shows as "no" in the table
        warnings.simplefilter("ignore", UserWarning)
        decisions = {name: [policy.decide(list(active)) for active in sets]
                     for name, sets in (("all", [list(range(n))]), ("ist", draws))}
    for name, key, sets, trains in (
            ("LoRA all, budget", "all", [list(range(n))], f"{base}, all layers"),
            ("IST depth-aware, budget", "ist", draws, f"{base}, {share}")):
        estimates = [planner.estimate(list(active), gradient_checkpointing=d.checkpointed)
                     for active, d in zip(sets, decisions[key], strict=True)]
        worst = max(estimates, key=lambda e: e.peak_bytes)
        mean_blocks = sum(len(d.checkpointed) for d in decisions[key]) / len(sets)
        rows.append((name, f"{trains}, {mean_blocks:.1f} checkpointed",
                     worst, _cost(planner, estimates, device)))
    return rows


#: The planner of each kind of row: (keywords of :class:`~ist_optim.MemoryPlanner`).
_PLANNERS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "qlora": {"method": "qlora", "double_quant": True},
    "full": {"method": "full"},
    "bnb": {"method": "full", "optimizer": "adamw8bit"},
    "master": {"method": "full", "optimizer": "adamw-fp32-master", "foreach": False},
    **{name: {"method": "full", "optimizer": name}
       for name in ("galore", "apollo", "apollo-mini", "galore-layerwise", "apollo-layerwise",
                    "apollo-mini-layerwise")},
}
_PROJECTED_ROWS = (("GaLore + GC", "galore"), ("APOLLO + GC", "apollo"),
                   ("APOLLO-Mini + GC", "apollo-mini"),
                   ("GaLore layer-wise + GC", "galore-layerwise"),
                   ("APOLLO layer-wise + GC", "apollo-layerwise"),
                   ("APOLLO-Mini layer-wise + GC", "apollo-mini-layerwise"))


def _planners(config: Any, common: dict[str, Any], adapters: dict[str, Any],
              projection_rank: int | None) -> dict[str, Any]:
    """One :class:`~ist_optim.MemoryPlanner` per kind of row (measured once each)."""
    from ..memory import MemoryPlanner

    out = {}
    try:
        for key, kwargs in _PLANNERS.items():
            extra = dict(adapters) if kwargs["method"] != "full" else {}
            if key in ("galore", "apollo", "galore-layerwise", "apollo-layerwise"):
                extra["projection_rank"] = projection_rank  # APOLLO-Mini stays at rank 1
            out[key] = MemoryPlanner(config, **kwargs, **extra, **common)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from None
    return out


def plan(config: Any, *, batch_size: int, seq_len: int, budget: int, rank: int = 32,
         alpha: float | None = None, targets: Sequence[str] = (), active: int | float = 0.25,
         dtype: Any = None, projection_rank: int | None = None,
         device: Device | str = "h100") -> list[PlanRow]:
    """Estimate every row of :data:`PLAN_ROWS` for ``config``: its peak, compute and step
    time on ``device`` (:meth:`ist_optim.MemoryPlanner.step_time`).

    Example:
        >>> from transformers import LlamaConfig
        >>> config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        ...                      num_attention_heads=4, vocab_size=256)
        >>> rows = plan(config, batch_size=2, seq_len=16, budget=2**30, rank=4,
        ...             targets=["q_proj", "v_proj"])
        >>> [row.name for row in rows] == list(PLAN_ROWS)
        True
    """
    import torch

    from ..planner.steptime import device_of

    try:
        device = device_of(device)
    except ValueError as err:
        raise CLIError(str(err)) from None
    n = int(config.num_hidden_layers)
    k = _active_count(active, n)
    worst = [0, *range(n - k + 1, n)]  # the lowest trained layer at the bottom
    common = {"batch_size": batch_size, "seq_len": seq_len,
              "dtype": torch.bfloat16 if dtype is None else dtype}
    p = _planners(config, common, {"lora_rank": rank, "lora_alpha": alpha,
                                   "lora_targets": list(targets)}, projection_rank)
    lora, qlora, full = p["lora"], p["qlora"], p["full"]
    random_draws = _draws(n, k, depth_aware=False)
    depth_draws = _draws(n, k, depth_aware=True)
    share = f"{k} of {n} layers"
    outside = {"train_embeddings": True, "train_head": True}
    adapters = f"LoRA r{rank}"
    quantized = f"NF4, {adapters}"
    gc_cut = {"gradient_checkpointing": True}
    qlora_budget = _budget_rows(qlora, budget, depth_draws, quantized, share, device)[1]

    def one(planner: Any, **kwargs: Any) -> tuple[Any, _Cost]:
        """A set-up with one active set: its estimate and cost."""
        est = planner.estimate(**kwargs)
        return est, _cost(planner, [est], device)

    def drawn(planner: Any, worst_set: Sequence[int], draws: Sequence[Sequence[int]],
              **kwargs: Any) -> tuple[Any, _Cost]:
        """A set-up that draws its active set: the worst draw's estimate, the mean cost."""
        return (planner.estimate(list(worst_set), **kwargs),
                _mean(planner, draws, device, **kwargs))

    lora_budget = _budget_rows(lora, budget, depth_draws, adapters, share, device)
    rows = [
        ("LoRA all", f"{adapters}, all {n} layers", *one(lora)),
        ("LoRA all + GC", f"{adapters}, all layers, checkpointing",
         *one(lora, gradient_checkpointing=True, cut_backward=False)),
        ("IST random 25%", f"{adapters}, {share} drawn at random",
         *drawn(lora, worst, random_draws)),
        ("IST depth-aware", f"{adapters}, {share} drawn close in depth",
         *drawn(lora, worst, depth_draws)),
        ("IST + GC + cut", f"{adapters}, {share}, checkpointing, backward cut",
         *drawn(lora, worst, random_draws, **gc_cut)),
        *lora_budget,
        ("QLoRA + GC", f"{quantized}, all layers, checkpointing",
         *one(qlora, gradient_checkpointing=True, cut_backward=False)),
        ("QLoRA + IST + GC + cut", f"{quantized}, {share}, GC, cut",
         *drawn(qlora, worst, random_draws, **gc_cut)),
        ("QLoRA + IST, budget", *qlora_budget[1:]),
        ("full AdamW", "all weights", *one(full, **outside)),
        ("full IST + offload", f"weights of {share} + embeddings, head",
         *drawn(full, worst, random_draws, offloaded_layers=range(n), **outside)),
        ("full AdamW8bit", "all weights, 8-bit state", *one(p["bnb"], **outside)),
        ("one block (BAdam)", "weights of 1 layer, fp32 master copy",
         *drawn(p["master"], [0], [[i] for i in range(n)])),
        *[(name, f"all weights, rank-{p[key].projection.rank} moments, GC",
           *one(p[key], gradient_checkpointing=True, **outside))
          for name, key in _PROJECTED_ROWS],
    ]
    return [PlanRow(name, trains, est.peak_bytes, est.host_bytes, float(cost.flops),
                    est.peak_bytes <= budget, est.phase, cost.seconds)
            for name, trains, est, cost in rows]


#: Rows whose optimizer step is priced as torch AdamW's although it is not (bitsandbytes'
#: 8-bit kernel, GaLore's and APOLLO's projections); their step time is marked ``*``.
APPROXIMATE_TIME_ROWS: tuple[str, ...] = (
    "full AdamW8bit", "GaLore + GC", "APOLLO + GC", "APOLLO-Mini + GC",
    "GaLore layer-wise + GC", "APOLLO layer-wise + GC", "APOLLO-Mini layer-wise + GC")
#: Rows whose step trains every layer (the rest train a share of them per step).
EVERY_LAYER_ROWS: tuple[str, ...] = tuple(
    name for name in PLAN_ROWS if not name.startswith(("IST", "QLoRA + IST", "full IST",
                                                       "one block")))


def fastest(rows: Sequence[PlanRow]) -> PlanRow | None:
    """The row of ``rows`` with the least predicted step time (then the least peak),
    among those whose step the model prices (not :data:`APPROXIMATE_TIME_ROWS`) when any
    is there; None for no rows.

    Example:
        >>> row = PlanRow("LoRA all", "", 2, 0, 1.0, True, "", seconds=2.0)
        >>> apollo = PlanRow("APOLLO-Mini + GC", "", 1, 0, 1.0, True, "", seconds=1.0)
        >>> fastest([row, apollo]).name, fastest([apollo]).name
        ('LoRA all', 'APOLLO-Mini + GC')
    """
    priced = [r for r in rows if r.name not in APPROXIMATE_TIME_ROWS] or list(rows)
    return min(priced, key=lambda r: (r.seconds, r.peak_bytes)) if priced else None


def _star(row: PlanRow) -> str:
    return "*" if row.name in APPROXIMATE_TIME_ROWS else ""


def format_plan(rows: Sequence[PlanRow], header: str, budget: int, device: str = "h100"
                ) -> str:
    """The table ``ist-finetune plan`` prints."""
    base, base_time = rows[0].flops, rows[0].seconds
    gib = budget / 2**30
    lines = [*header.splitlines(), "",
             f"| configuration | trains | peak GiB | host GiB | fits {gib:g} GiB | compute "
             f"| step time |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for row in rows:
        host = f"{row.host_bytes / 2**30:.1f}" if row.host_bytes else "-"
        lines.append(f"| {row.name} | {row.trains} | {row.peak_bytes / 2**30:.1f} | {host} | "
                     f"{'yes' if row.fits else 'no'} | {row.flops / base:.2f}x | "
                     f"{row.seconds / base_time:.2f}x{_star(row)} |")
    fitting = [row for row in rows if row.fits]
    lines.append("")
    if fitting:
        for label, among in (("fastest configuration that fits", fitting),
                             ("fastest that trains every layer each step",
                              [r for r in fitting if r.name in EVERY_LAYER_ROWS])):
            best = fastest(among)
            if best is not None:
                lines.append(f"{label}: {best.name} ({best.peak_bytes / 2**30:.1f} GiB, "
                             f"{best.seconds / base_time:.2f}x{_star(best)} the step time of "
                             f"LoRA all)")
    else:
        least = min(rows, key=lambda r: r.peak_bytes)
        lines.append(f"nothing fits {gib:g} GiB; the smallest is {least.name} "
                     f"({least.peak_bytes / 2**30:.1f} GiB): lower --batch-size or --seq-len")
    lines.append("peak: allocated device memory of a steady-state step, worst draw of the "
                 "active set;")
    lines.append("host: optimizer state offloaded; compute: FLOPs per step (mean draw) "
                 "relative to LoRA all;")
    lines.append(f"step time: predicted on {device} (every operator's FLOPs and bytes, mean draw) "
                 "relative to LoRA all;")
    lines.append("*: the optimizer step priced as AdamW's (8-bit and projected updates are "
                 "not modelled);")
    lines.append("budget: memory_budget checkpoints the blocks each draw needs (mean count); "
                 "NF4: 4-bit base")
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    """Run ``ist-finetune plan`` with ``argv`` (the words after ``plan``)."""
    import torch

    from ..memory.shapes import load_config

    args = build_plan_parser().parse_args(argv)
    budget = parse_budget(args.budget)
    try:
        config = load_config(args.model)
    except ValueError as err:
        raise CLIError(str(err)) from None
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    if not targets:
        raise CLIError("--target-modules is empty; give e.g. q_proj,v_proj")
    dtype = getattr(torch, args.dtype)
    rows = plan(config, batch_size=args.batch_size, seq_len=args.seq_len, budget=budget,
                rank=args.rank, alpha=args.alpha, targets=targets, active=args.active_layers,
                dtype=dtype, projection_rank=args.projection_rank, device=args.device)
    if args.json:
        print(json.dumps({"model": args.model, "batch_size": args.batch_size,
                          "seq_len": args.seq_len, "dtype": args.dtype,
                          "device": args.device,
                          "budget_bytes": budget, "rows": [r.summary() for r in rows]},
                         indent=1))
        return 0
    params = (config.num_hidden_layers, config.hidden_size)
    header = (f"ist-finetune plan: {args.model} ({params[0]} layers, hidden {params[1]}), "
              f"batch {args.batch_size} x {args.seq_len}, {args.dtype}\n"
              f"LoRA r{args.rank} on {','.join(targets)}; budget {budget / 2**30:g} GiB")
    print(format_plan(rows, header, budget, args.device))
    return 0
