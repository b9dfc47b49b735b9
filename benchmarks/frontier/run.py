"""Running the frontier: the two peaks that bound it (and APOLLO-Mini + GC's, all
accounted as the budget study accounts them), the fit of each method at a budget, the
methods built, and the loop over the budgets left, each budget's methods timed
interleaved (:mod:`.timing`) and written to ``--out`` one row per method.

Fit, as the budget study checks it: a method under ``memory_budget`` fits when its easiest
step is planned within the budget less the planning headroom
(:func:`benchmarks.budget.run.check_fit`; every layer active, so its only step); a method
whose checkpointing is fixed fits when its accounted peak is within the budget (``lora+gc``,
``lora``, ``apollo-mini+gc``: measured once, before any budget); ``lora+every-k`` takes the
largest k whose planned peak is within the budget. Every method's last warm-up step at a
budget is accounted too, and its row keeps that peak.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import torch

from ist_optim import BlockCheckpointer, ISTOptimizer, MemoryPlanner, discover_layers
from ist_optim.cli import block_batches
from ist_optim.planner.from_model import planner_for_model

from ..benchkit.models import pretrained, projected_param_groups
from ..benchkit.report import append_row
from ..budget.methods import METHODS as STUDY_METHODS
from ..budget.methods import Method
from ..budget.run import Data, build, check_fit, run_one
from .budgets import MIB
from .methods import BUDGETED, BUILT_AS, LR, every_kth, study_method
from .timing import Timed, interleaved_order, run_interleaved

#: Accounted steps of each peak measurement (the budget study's: 3 for its budget, 2 for
#: APOLLO-Mini's fit, the first step computing the projectors).
PEAK_STEPS = {"lora+gc": 3, "lora": 3, "apollo-mini+gc": 2}


def shape_of(args: argparse.Namespace) -> dict[str, Any]:
    """The fields a row's measurements depend on."""
    return {"device": args.device, "model": args.model, "batch_size": args.batch_size,
            "seq_len": args.seq_len}


def measure_peaks(data: Data, args: argparse.Namespace) -> dict[str, Any]:
    """The ``{"phase": "peaks"}`` row: the accounted peaks of ``lora+gc``, LoRA without
    checkpointing and ``apollo-mini+gc`` (:func:`benchmarks.budget.run.run_one`, as the
    budget study measures its budget and APOLLO-Mini's fit)."""
    methods = {"lora+gc": STUDY_METHODS["lora+gc"], "lora": Method("lora", "adamw", "none"),
               "apollo-mini+gc": STUDY_METHODS["apollo-mini+gc"]}
    row: dict[str, Any] = {"phase": "peaks", **shape_of(args), "margin": args.margin}
    for name, method in methods.items():
        run = run_one(name, method, LR[name], 0, PEAK_STEPS[name], data, args, None,
                      eval_every=10**9, splits=(), base={})
        row[f"{name}_peak_bytes"] = run["peak_bytes"]
        print(f"peak of {name}: {run['peak_bytes'] / MIB:.1f} MiB "
              f"({run['cpu_seconds_per_step']:.2f} CPU s/step)", flush=True)
    return row


def apollo_planner(model: torch.nn.Module, args: argparse.Namespace) -> MemoryPlanner:
    """The planner of ``apollo-mini+budget``: the model's shape and attention as
    :func:`planner_for_model` reads them, APOLLO-Mini as it reads that optimizer's groups,
    and ``keep_logits=False`` (the loop keeps only the loss), before the optimizer exists."""
    config = model.config
    attention = "eager" if getattr(config, "_attn_implementation", None) == "eager" \
        else "sdpa"
    return MemoryPlanner(config, batch_size=args.batch_size, seq_len=args.seq_len,
                         dtype=args.dtype, method="full", optimizer="apollo-mini",
                         attention=attention, keep_logits=False)


def build_apollo_budget(args: argparse.Namespace, budget: int, seed: int = 0
                        ) -> tuple[torch.nn.Module, ISTOptimizer]:
    """``apollo-mini+budget``: APOLLO-Mini (the budget study's groups) inside
    ``ISTOptimizer`` with every layer active and ``memory_budget``."""
    from apollo_torch import APOLLOAdamW

    model = pretrained(args.model, "full", rank=args.rank, seed=seed, dtype=args.dtype,
                       device=args.device)
    optimizer = ISTOptimizer(APOLLOAdamW, model,
                             params=projected_param_groups(model, "apollo-mini"),
                             lr=LR["apollo-mini+budget"], weight_decay=0.0, seed=seed,
                             active_layers=1.0, sampling="uniform", memory_budget=budget,
                             memory_planner=apollo_planner(model, args))
    return model, optimizer


def lora_planner(args: argparse.Namespace) -> MemoryPlanner:
    """The planner of LoRA on every layer (AdamW, the loop keeping only the loss)."""
    model = pretrained(args.model, "lora", rank=args.rank, seed=0, dtype=args.dtype,
                       device=args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return planner_for_model(model, torch.optim.AdamW(trainable), batch_size=args.batch_size,
                             seq_len=args.seq_len, keep_logits=False)


def largest_k(planner: MemoryPlanner, budget: int) -> int | None:
    """The largest k whose every-k-th-block checkpointing is planned within ``budget``
    (None: not even every block)."""
    layers = planner.num_layers
    for k in range(layers, 0, -1):
        if planner.estimate(None, gradient_checkpointing=every_kth(layers, k)
                            ).peak_bytes <= budget:
            return k
    return None


def fits(name: str, budget: int, peaks: dict[str, Any], args: argparse.Namespace,
         planner: MemoryPlanner) -> dict[str, Any]:
    """The ``{"phase": "fit"}`` row of ``name`` at ``budget``: whether it fits, how that was
    decided, and (``lora+every-k``) its k."""
    row: dict[str, Any] = {"phase": "fit", "method": name, "budget_bytes": budget,
                           **shape_of(args)}
    if name in ("lora+gc", "lora", "apollo-mini+gc"):
        return {**row, "by": "measured", "peak_bytes": peaks[f"{name}_peak_bytes"],
                "fits": peaks[f"{name}_peak_bytes"] <= budget}
    if name == "lora+every-k":
        k = largest_k(planner, budget)
        return {**row, "by": "planned", "k": k, "fits": k is not None}
    if name == "apollo-mini+budget":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _model, optimizer = build_apollo_budget(args, budget)
            policy = optimizer.memory_budget.policy
            decision = policy.decide(list(range(optimizer.num_layers)))
        optimizer.close()
        return {**row, "by": "planned", "best_case_peak_bytes": decision.peak_bytes,
                "limit_bytes": policy.limit, "checkpointed_layers": decision.checkpointed,
                "fits": decision.fits}
    study = check_fit(BUILT_AS[name], study_method(name), args, budget)
    return {**row, "by": "planned", "best_case_peak_bytes": study["best_case_peak_bytes"],
            "limit_bytes": study["limit_bytes"],
            "checkpointed_layers": study["checkpointed_layers"], "fits": study["fits"]}


def build_timed(name: str, budget: int, fit: dict[str, Any], data: Data,
                args: argparse.Namespace) -> Timed:
    """``name`` built for ``budget``, its batches the budget study's seed-0 order."""
    if name == "apollo-mini+budget":
        model, optimizer = build_apollo_budget(args, budget)
    elif name in ("lora", "lora+every-k"):
        model, optimizer = build(Method("lora", "adamw", "none"), LR[name], 0, args, None)
    else:
        model, optimizer = build(study_method(name), LR[name], 0, args,
                                 budget if name in BUDGETED else None)
    model.train()
    layers = len(discover_layers(model))
    if name in BUDGETED:
        def checkpointed() -> int:
            return len(optimizer.memory_report()["checkpointed_layers"])
    elif name == "lora+every-k":
        blocks = [b for _, b in discover_layers(model)]
        BlockCheckpointer(blocks).set(every_kth(layers, fit["k"]))
        count = len(every_kth(layers, fit["k"]))

        def checkpointed() -> int:
            return count
    else:
        count = layers if name in ("lora+gc", "apollo-mini+gc") else 0  # model's GC or none

        def checkpointed() -> int:
            return count
    batches = block_batches(data.train, args.seq_len, args.batch_size,
                            generator=torch.Generator().manual_seed(0))
    return Timed(name, model, optimizer, batches, checkpointed, args.device)


def time_budget(budget: int, names: list[str], fit_rows: dict[str, dict[str, Any]],
                data: Data, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time ``names`` (each fitting ``budget``) interleaved; one row per method."""
    timed = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the budget's take-over warning
        for name in names:
            timed[name] = build_timed(name, budget, fit_rows[name], data, args)
    order = interleaved_order(names, rounds=args.rounds, per_turn=args.per_turn,
                              warmup=args.warmup_steps)
    run_interleaved(timed, order, lambda s: print(s, flush=True))
    rows = []
    for name, t in timed.items():
        t.close()
        rows.append({"phase": "time", "method": name, "budget_bytes": budget,
                     **shape_of(args), "layers": len(discover_layers(t.model)),
                     "threads": torch.get_num_threads(),
                     "warmup_steps": args.warmup_steps, "rounds": args.rounds,
                     "per_turn": args.per_turn, "k": fit_rows[name].get("k"),
                     "peak_bytes": t.peak_bytes, **t.rows})
    return rows


def run_budgets(budgets: list[int], rows: list[dict[str, Any]], peaks: dict[str, Any],
                data: Data, args: argparse.Namespace) -> None:
    """For each budget: the fit rows of ``--methods`` not yet in ``rows``, then the methods
    that fit and have no time row, timed together; rows appended to ``--out`` once the
    budget's methods are all timed (a budget cut short is timed again whole; one resumed
    with some methods already timed times the rest among themselves, so their ratios to
    ``lora+gc`` then span two runs)."""
    planner = lora_planner(args)
    shape = shape_of(args)
    for budget in budgets:
        mine = [r for r in rows if r.get("budget_bytes") == budget
                and all(r.get(k) == v for k, v in shape.items())]
        fit_rows = {r["method"]: r for r in mine if r["phase"] == "fit"}
        for name in args.methods:
            if name not in fit_rows:
                fit_rows[name] = fits(name, budget, peaks, args, planner)
                append_row(args.out, fit_rows[name])
        done = {r["method"] for r in mine if r["phase"] == "time"}
        left = [n for n in args.methods if fit_rows[n]["fits"] and n not in done]
        unfit = [n for n in args.methods if not fit_rows[n]["fits"]]
        print(f"budget {budget / MIB:.1f} MiB: timing {left or 'nothing left'}"
              + (f"; not fitting: {unfit}" if unfit else ""), flush=True)
        if left:
            for row in time_budget(budget, left, fit_rows, data, args):
                append_row(args.out, row)
