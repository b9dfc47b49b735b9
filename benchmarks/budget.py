"""Inside one memory budget: which method gives the best model for the time spent?

The question a user with an N GiB card has. The budget is the *measured* peak of the
baseline a user would run, LoRA on every layer with gradient checkpointing (``lora+gc``),
plus ``--margin`` (default 10%); LoRA without checkpointing must not fit it (checked, the
run stops otherwise). Every method then trains inside that budget:

* adapters or BAdam with the model's own gradient checkpointing on every block
  (``lora+gc``, ``dora+gc``, ``badam+gc``);
* IST with ``memory_budget=`` (``+budget``): per step, only the blocks that step needs
  checkpointed to fit are checkpointed, none when the active set fits as it is. Before
  any step, each such method's easiest step (the top blocks active) is planned; when even
  it cannot fit, the method is recorded as not fitting and not run.

Protocol (CPU, SmolLM2-135M, the Shakespeare plays of ``benchmarks/few_data.py``: training
plays, 2 validation plays, the 4 held-out test plays): each method's learning rate is
chosen from ``--lrs`` by the validation loss after ``--sweep-steps`` steps on seed 0; the
chosen rate then runs ``--steps`` steps on every seed of ``--seeds`` (the sweep never sees
the test plays). Batches of ``--batch-size`` x ``--seq-len`` tokens in the same order for
every method of a seed (one pass over the training plays, no block repeats).

Measured per run: the test (and validation) loss every ``--eval-every`` steps, the CPU
time (``time.process_time``) and wall time of every step, and the peak memory. On CPU the
peak is :func:`ist_optim.account_step` (exact tensor bytes) of steps 1 and 2, every 10th
step, and every IST step whose predicted peak is the highest so far; accounting slows a
step (~12%), so an accounted step's time is replaced by the mean of the run's other steps.
On CUDA every step's ``torch.cuda.max_memory_allocated`` is the peak and the time is wall
time (synchronised).

Rows go to ``--out`` (JSONL) as each run ends; a rerun skips what is there, so a cut run
resumes. ``--report`` builds the tables (equal steps, equal CPU time by linear
interpolation of the eval points, paired per-seed differences vs ``lora+gc``) and the
curves. Commands of docs/benchmarks.md::

    OMP_NUM_THREADS=1 python benchmarks/budget.py --methods lora+gc lora+ist-fo-da+budget
    python benchmarks/budget.py --report benchmarks/results/budget/runs.jsonl \\
        --table benchmarks/results/budget/budget.md --plot benchmarks/results/budget/curves.png

GPU mode (``--device cuda``): the same methods at a larger shape (bf16, 8 x 512 tokens) for
``--steps 30`` without a sweep (``--lrs`` one rate each), memory and wall time only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from few_data import pick_blocks, split_plays, token_stream  # noqa: E402

from ist_optim import ISTOptimizer, account_step  # noqa: E402
from ist_optim.budget import planner_for_model  # noqa: E402
from ist_optim.cli.data import block_batches, load_documents  # noqa: E402
from ist_optim.cli.models import add_adapters, load_model, load_tokenizer  # noqa: E402
from ist_optim.cli.report import markdown_table, mean_range  # noqa: E402
from ist_optim.cli.train import build_optimizer, evaluate  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "results" / "budget"
BASELINE = "lora+gc"
#: The layer-wise peers IST with adapters is also compared with, seed by seed.
PEERS = ("lisa+budget", "badam+gc")


@dataclass(frozen=True)
class Method:
    """A way to fine-tune inside the budget.

    ``checkpointing``: ``"model"`` (every block, the model's own gradient checkpointing) or
    ``"budget"`` (``ISTOptimizer(memory_budget=...)``).
    """

    peft: str
    optimizer: str
    checkpointing: str
    ist_kwargs: dict[str, Any] = field(default_factory=dict)


FIRST_ORDER = {"estimator": "first-order", "sampling": "depth-aware"}
METHODS: dict[str, Method] = {
    "lora+gc": Method("lora", "adamw", "model"),
    "dora+gc": Method("dora", "adamw", "model"),
    # LoRA on every layer, every step, in ISTOptimizer: memory_budget then checkpoints only
    # the blocks needed to fit (the same updates as lora+gc; only memory and time differ).
    "lora+budget": Method("lora", "ist", "budget", {"active_layers": 1.0, "sampling": "uniform"}),
    "lora+ist+budget": Method("lora", "ist", "budget"),
    "lora+ist-fo-da+budget": Method("lora", "ist", "budget", FIRST_ORDER),
    "lora+uniform+budget": Method("lora", "ist", "budget", {"sampling": "uniform"}),
    # levers on lora+ist-fo-da+budget: prefer draws that fit (fewer checkpointed blocks),
    # twice and three times the active layers (more progress per step),
    "lora+ist-fo-da+budget+redraw4": Method("lora", "ist", "budget",
                                            {**FIRST_ORDER, "budget_redraws": 4}),
    "lora+ist-fo-da-50%+budget": Method("lora", "ist", "budget",
                                        {**FIRST_ORDER, "active_layers": 0.5}),
    "lora+ist-fo-da-75%+budget": Method("lora", "ist", "budget",
                                        {**FIRST_ORDER, "active_layers": 0.75}),
    # and a fresh optimizer state (Adam's bias correction restarts) each time a layer
    # becomes active, instead of its state kept from its last active step
    "lora+ist-fo-da+budget+drop": Method("lora", "ist", "budget",
                                         {**FIRST_ORDER, "state_policy": "drop"}),
    "full+ist-3+budget": Method("full", "ist", "budget",
                                {**FIRST_ORDER, "active_layers": 3, "state_policy": "drop"}),
    "full+ist-25%+budget": Method("full", "ist", "budget",
                                  {**FIRST_ORDER, "active_layers": 0.25,
                                   "state_policy": "drop"}),
    # the active-set schedule (issue 21): every layer for the first N steps, then IST's
    # draws (the dense steps checkpoint what the budget needs, like lora+budget)
    "lora+uniform-dense25+budget": Method("lora", "ist", "budget",
                                          {"sampling": "uniform", "dense_steps": 25}),
    "lora+uniform-dense50+budget": Method("lora", "ist", "budget",
                                          {"sampling": "uniform", "dense_steps": 50}),
    "lora+uniform-dense100+budget": Method("lora", "ist", "budget",
                                           {"sampling": "uniform", "dense_steps": 100}),
    "lora+ist-fo-da-dense50+budget": Method("lora", "ist", "budget",
                                            {**FIRST_ORDER, "dense_steps": 50}),
    "lora+uniform-ramp100+budget": Method("lora", "ist", "budget",
                                          {"sampling": "uniform", "ramp_steps": 100}),
    # LISA-style: 2 uniformly drawn blocks of full fine-tuning per step, no importance.
    "lisa+budget": Method("full", "ist", "budget",
                          {"sampling": "uniform", "active_layers": 2, "state_policy": "drop"}),
    "badam+gc": Method("full", "badam", "model"),
}
LR_GRID = (5e-4, 1e-3, 2e-3, 4e-3)
# Full fine-tuning diverges at adapter rates (benchmarks/few_data.py chose 1e-4): its grid is
# shifted down by the same factors.
FULL_LR_GRID = (1e-4, 2e-4, 5e-4, 1e-3)


#: Rates a sweep may add beyond its grid when its best rate is at an edge (see :func:`todo`).
MAX_EXTENSIONS = 2


def lr_grid(name: str) -> tuple[float, ...]:
    """The rates swept for method ``name``."""
    return FULL_LR_GRID if METHODS[name].peft == "full" else LR_GRID


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    train: torch.Tensor  # one token stream (training plays)
    val: torch.Tensor  # blocks
    test: torch.Tensor  # blocks
    eval_batch: int

    def batches(self, blocks: torch.Tensor, device: str) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device) for k, v in b.items()}
                for b in block_batches(blocks.flatten(), blocks.shape[1], self.eval_batch)]


def prepare(args: argparse.Namespace) -> Data:
    docs = load_documents(args.data)
    train_i, val_i, test_i = split_plays([d.name for d in docs], 0.1, 2)
    tokenizer = load_tokenizer(args.model)

    def stream(idx: list[int]) -> torch.Tensor:
        return token_stream(tokenizer, [docs[i].text for i in idx])

    return Data(stream(train_i), pick_blocks(stream(val_i), args.seq_len, args.eval_blocks),
                pick_blocks(stream(test_i), args.seq_len, args.eval_blocks), args.eval_batch)


# --------------------------------------------------------------------------- measuring
class PeakMeter:
    """Peak bytes of a training step: exact tensor accounting on CPU (some steps), the
    allocator's peak on CUDA (every step)."""

    def __init__(self, device: str, model: torch.nn.Module, optimizer: Any) -> None:
        self.device, self.model, self.optimizer = device, model, optimizer
        self.peak = 0
        self.accounted: list[int] = []
        self._highest_prediction = -1

    def wants(self, step: int, predicted: int | None) -> bool:
        if self.device != "cpu":
            return False
        new_high = predicted is not None and predicted > self._highest_prediction
        if predicted is not None:
            self._highest_prediction = max(self._highest_prediction, predicted)
        return step <= 2 or step % 10 == 0 or new_high

    def run(self, step: int, one_step: Callable[[], None], predicted: int | None) -> bool:
        """Run the step (accounted if chosen); returns whether it was accounted."""
        if self.device != "cpu":
            torch.cuda.reset_peak_memory_stats()
            one_step()
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            return False
        if not self.wants(step, predicted):
            one_step()
            return False
        peak = account_step(one_step, model=self.model, optimizer=self.optimizer).peak_bytes
        self.peak = max(self.peak, peak)
        self.accounted.append(step)
        return True


def gradient_checkpointing(model: Any) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build(method: Method, lr: float, seed: int, args: argparse.Namespace,
          budget: int | None) -> tuple[torch.nn.Module, Any]:
    """The model (adapters added, checkpointing set up) and the optimizer of ``method``."""
    model = add_adapters(load_model(args.model, args.dtype), method.peft, rank=args.rank,
                         seed=seed).to(args.device)
    ist_kwargs = dict(method.ist_kwargs)
    if method.checkpointing == "model":
        gradient_checkpointing(model)
    elif budget is not None:
        # The loop below keeps only the loss, not the output's logits (keep_logits=False).
        trainable = [p for p in model.parameters() if p.requires_grad]
        planner = planner_for_model(model, torch.optim.AdamW(trainable),
                                    batch_size=args.batch_size, seq_len=args.seq_len,
                                    keep_logits=False)
        ist_kwargs.update(memory_budget=budget, memory_planner=planner)
    optimizer = build_optimizer(method.optimizer, model, lr=lr, seed=seed,
                                ist_kwargs=ist_kwargs if method.optimizer == "ist" else None)
    return model, optimizer


def check_fit(name: str, method: Method, args: argparse.Namespace, budget: int
              ) -> dict[str, Any]:
    """Whether an IST method under ``memory_budget`` can fit the budget at all, before any
    step is spent on it: the planner's lowest peak over the method's easiest step (the top
    ``num_active`` blocks active, so the backward is cut highest) with the blocks the policy
    checkpoints. When even that is over the budget's planning limit no draw fits, and the
    method is reported as not fitting instead of run (it would train over the budget)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the budget warns when a step does not fit
        _model, optimizer = build(method, max(lr_grid(name)), 0, args, budget)
        policy = optimizer.memory_budget.policy
        top = list(range(optimizer.num_layers - optimizer.num_active, optimizer.num_layers))
        decision = policy.decide(top)
    optimizer.close()
    return {"phase": "fit", "method": name, "device": args.device, "budget_bytes": budget,
            "limit_bytes": policy.limit, "active_layers": top,
            "best_case_peak_bytes": decision.peak_bytes,
            "checkpointed_layers": decision.checkpointed, "fits": decision.fits}


def run_one(name: str, method: Method, lr: float, seed: int, steps: int, data: Data,
            args: argparse.Namespace, budget: int | None, *, eval_every: int,
            splits: tuple[str, ...], base: dict[str, float]) -> dict[str, Any]:
    """Train ``method`` (called ``name``) at ``lr`` for ``steps`` steps inside ``budget``
    (None: unbudgeted, to measure the budget itself)."""
    device = args.device
    model, optimizer = build(method, lr, seed, args, budget)
    ist = optimizer if isinstance(optimizer, ISTOptimizer) else None
    model.train()
    batches = block_batches(data.train, args.seq_len, args.batch_size,
                            generator=torch.Generator().manual_seed(seed))
    scheduler = lr_schedule(optimizer, args.schedule, steps, args.warmup)
    meter = PeakMeter(device, model, optimizer)
    cpu, wall, accounted, losses, checkpointed = [], [], [], [], []
    evals = [{"step": 0, **base}]
    held: dict[str, float] = {}

    def one_step(batch: dict[str, torch.Tensor]) -> None:
        loss = model(**batch).loss
        loss.backward()
        # every parameter with a gradient (IST's trainable set changes from step to step)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                       1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        held["loss"] = loss.item()

    for step in range(1, steps + 1):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        report = ist.memory_report() if ist is not None and budget is not None else {}
        checkpointed.append(len(report.get("checkpointed_layers", [])))
        start, start_cpu = time.perf_counter(), time.process_time()
        accounted.append(meter.run(step, lambda b=batch: one_step(b),
                                   report.get("predicted_peak_bytes")))
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start)
        losses.append(held["loss"])
        if step % eval_every == 0 or step == steps:
            evals.append({"step": step, **{s: evaluate(model, data.batches(
                getattr(data, s), device)) for s in splits}})
    if ist is not None:
        ist.close()
    plain = [c for c, a in zip(cpu, accounted, strict=True) if not a] or cpu
    plain_wall = [w for w, a in zip(wall, accounted, strict=True) if not a] or wall
    cpu_fair = [statistics.fmean(plain) if a else c for c, a in zip(cpu, accounted, strict=True)]
    wall_fair = [statistics.fmean(plain_wall) if a else w
                 for w, a in zip(wall, accounted, strict=True)]
    return {"method": name, "lr": lr, "seed": seed, "steps": steps, "device": device,
            "schedule": args.schedule, "warmup": args.warmup,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "model": args.model,
            "budget_bytes": budget, "peak_bytes": meter.peak, "accounted_steps": meter.accounted,
            "cpu_seconds": cpu_fair, "wall_seconds": wall_fair,
            "cpu_seconds_per_step": statistics.fmean(plain),
            "wall_seconds_per_step": statistics.fmean(plain_wall),
            "checkpointed_blocks": checkpointed, "train_losses": losses, "evals": evals}


def lr_schedule(optimizer: Any, kind: str, steps: int, warmup: float) -> Any:
    """The rate schedule a user of the HF Trainer runs: ``"linear"`` (the Trainer's default:
    linear warm-up over ``warmup`` of the steps, then linear decay to 0 at ``steps``) or
    ``"cosine"`` (the same warm-up, then cosine decay to 0); ``"constant"``: None, the rate
    as set (the protocol of the first budget tables)."""
    if kind == "constant":
        return None
    from transformers import get_scheduler

    return get_scheduler(kind, optimizer, num_warmup_steps=round(warmup * steps),
                         num_training_steps=steps)


def measure_budget(data: Data, args: argparse.Namespace, base: dict[str, float]
                   ) -> dict[str, Any]:
    """The budget: the peak of ``lora+gc`` plus the margin; LoRA without checkpointing must
    exceed it."""
    measured = {name: run_one(name, method, 1e-3, 0, 3, data, args, None, eval_every=10**9,
                              splits=(), base=base)
                for name, method in ((BASELINE, METHODS[BASELINE]),
                                     ("lora", Method("lora", "adamw", "none")))}
    gc, plain = measured[BASELINE], measured["lora"]
    budget = int(gc["peak_bytes"] * (1 + args.margin))
    if plain["peak_bytes"] <= budget:
        raise SystemExit(f"LoRA without checkpointing peaks at {plain['peak_bytes']:,} bytes, "
                         f"within the budget {budget:,}: lower --margin")
    return {"phase": "budget", "device": args.device, "model": args.model,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "margin": args.margin,
            "lora_gc_peak_bytes": gc["peak_bytes"], "lora_peak_bytes": plain["peak_bytes"],
            "budget_bytes": budget, "lora_gc_cpu_seconds_per_step": gc["cpu_seconds_per_step"],
            "lora_cpu_seconds_per_step": plain["cpu_seconds_per_step"]}


# --------------------------------------------------------------------------- plan
def read(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(line) for p in paths if p.exists()
            for line in p.read_text().splitlines() if line.strip()]


def runs_of_schedule(rows: list[dict[str, Any]], schedule: str) -> list[dict[str, Any]]:
    """The rows of runs at rate schedule ``schedule`` (rows written before schedules existed
    ran at a constant rate), with the budget and fit rows, which every schedule shares.

    Example:
        >>> rows = [{"phase": "budget"}, {"phase": "final"},
        ...         {"phase": "final", "schedule": "linear"}]
        >>> runs_of_schedule(rows, "linear")
        [{'phase': 'budget'}, {'phase': 'final', 'schedule': 'linear'}]
    """
    return [r for r in rows if r.get("phase") in ("budget", "fit")
            or r.get("schedule", "constant") == schedule]


def chosen_lrs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per method, the swept rate with the lowest final validation loss.

    Example:
        >>> rows = [{"phase": "sweep", "method": "m", "lr": lr, "evals": [{"val": v}]}
        ...         for lr, v in ((1e-3, 4.0), (2e-3, 3.5))]
        >>> chosen_lrs(rows)
        {'m': 0.002}
    """
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r.get("phase") == "sweep":
            val = r["evals"][-1]["val"]
            if r["method"] not in best or val < best[r["method"]][0]:
                best[r["method"]] = (val, r["lr"])
    return {m: lr for m, (_v, lr) in best.items()}


def todo(methods: list[str], grids: dict[str, tuple[float, ...]], seeds: list[int],
         rows: list[dict[str, Any]], *, extend: bool = True
         ) -> list[tuple[str, str, float, int]]:
    """The runs left, as (phase, method, lr, seed): first every method's sweep on seed 0
    (methods with one rate have none), then per method its chosen rate on every seed.

    With ``extend``, a sweep whose best rate is the highest (lowest) swept is extended by
    the rate twice as high (half as low), up to :data:`MAX_EXTENSIONS` rates, so that the
    chosen rate is not an edge of the grid.

    Example:
        >>> todo(["a"], {"a": (1.0, 2.0)}, [0, 1], [])
        [('sweep', 'a', 1.0, 0), ('sweep', 'a', 2.0, 0)]
        >>> todo(["a"], {"a": (1.0,)}, [0, 1], [])
        [('final', 'a', 1.0, 0), ('final', 'a', 1.0, 1)]
        >>> rows = [{"phase": "sweep", "method": "a", "lr": lr, "seed": 0,
        ...          "evals": [{"val": v}]} for lr, v in ((1.0, 4.0), (2.0, 3.0))]
        >>> todo(["a"], {"a": (1.0, 2.0)}, [0], rows)  # 2.0 is best and the edge
        [('sweep', 'a', 4.0, 0)]
    """
    have = {(r["phase"], r["method"], r["lr"], r["seed"]) for r in rows
            if r.get("phase") in ("sweep", "final")}
    sweep = [("sweep", m, lr, 0) for m in methods if len(grids[m]) > 1 for lr in grids[m]
             if ("sweep", m, lr, 0) not in have]
    if sweep:
        return sweep
    chosen = {**chosen_lrs(rows), **{m: g[0] for m, g in grids.items() if len(g) == 1}}
    for m in methods:
        swept = sorted(lr for phase, name, lr, _seed in have if phase == "sweep" and name == m)
        if not extend or len(grids[m]) == 1 or len(swept) >= len(grids[m]) + MAX_EXTENSIONS:
            continue
        edge = {swept[-1]: swept[-1] * 2, swept[0]: swept[0] / 2}.get(chosen[m])
        if edge is not None:
            sweep.append(("sweep", m, edge, 0))
    if sweep:
        return sweep
    return [("final", m, chosen[m], s) for m in methods for s in seeds
            if ("final", m, chosen[m], s) not in have]


# --------------------------------------------------------------------------- report
def at_time(run: dict[str, Any], seconds: float, split: str = "test") -> float:
    """The ``split`` loss at ``seconds`` of training CPU time, linearly interpolated
    between eval points (NaN past the run's end).

    Example:
        >>> run = {"cpu_seconds": [1.0, 1.0], "evals": [{"step": 0, "test": 4.0},
        ...                                               {"step": 2, "test": 3.0}]}
        >>> at_time(run, 1.0)
        3.5
    """
    clock = [0.0]
    for s in run["cpu_seconds"]:
        clock.append(clock[-1] + s)
    points = [(clock[e["step"]], e[split]) for e in run["evals"] if split in e]
    for (t0, v0), (t1, v1) in zip(points, points[1:], strict=False):
        if t0 <= seconds <= t1:
            return v0 + (v1 - v0) * (seconds - t0) / (t1 - t0) if t1 > t0 else v1
    return math.nan


def equal_time_gap(run: dict[str, Any], ref: dict[str, Any]) -> float:
    """``run``'s test loss minus ``ref``'s at the shorter run's total CPU time (the longer
    run's loss interpolated there, see :func:`at_time`).

    Example:
        >>> fast = {"cpu_seconds": [1.0, 1.0], "evals": [{"step": 0, "test": 4.0},
        ...                                                {"step": 2, "test": 3.0}]}
        >>> slow = {"cpu_seconds": [2.0, 2.0], "evals": [{"step": 0, "test": 4.0},
        ...                                                {"step": 2, "test": 2.0}]}
        >>> equal_time_gap(fast, slow)  # at 2 s: 3.0 against 3.0
        0.0
    """
    t = min(sum(run["cpu_seconds"]), sum(ref["cpu_seconds"]))
    return at_time(run, t) - at_time(ref, t)


def steps_worth(run: dict[str, Any], baseline: dict[str, Any]) -> float:
    """The baseline step at which the baseline's test loss first equals ``run``'s final test
    loss (linear between eval points; NaN when the baseline never gets that high or low).

    Example:
        >>> base = {"evals": [{"step": 0, "test": 5.0}, {"step": 10, "test": 3.0}]}
        >>> steps_worth({"evals": [{"step": 10, "test": 4.0}]}, base)
        5.0
    """
    target = run["evals"][-1]["test"]
    points = [(e["step"], e["test"]) for e in baseline["evals"] if "test" in e]
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        if v1 <= target <= v0:
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1) if v0 > v1 else float(s1)
    return math.nan


def final_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The final runs at each method's chosen rate: a rate swept later (an edge extension,
    see :func:`todo`) supersedes the finals run at the previous choice."""
    chosen = chosen_lrs(rows)
    return [r for r in rows if r.get("phase") == "final"
            and chosen.get(r["method"], r["lr"]) == r["lr"]]


def seed_pairs(by: dict[tuple[str, int], dict[str, Any]], seeds: list[int], method: str,
               ref: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(run of ``method``, run of ``ref``) for every seed both ran."""
    return [(by[method, s], by[ref, s]) for s in seeds if (method, s) in by and (ref, s) in by]


def paired_table(by: dict[tuple[str, int], dict[str, Any]], seeds: list[int],
                 pairs_of: list[tuple[str, str]]) -> str:
    """Per (method, reference): the test-loss differences of the seeds both ran, at equal
    steps and at equal CPU time, and the CPU s/step ratio."""
    rows = []
    for m, ref in pairs_of:
        pairs = seed_pairs(by, seeds, m, ref)
        if not pairs:
            continue
        steps_d = [a["evals"][-1]["test"] - b["evals"][-1]["test"] for a, b in pairs]
        time_d = [equal_time_gap(a, b) for a, b in pairs]
        ratio = [a["cpu_seconds_per_step"] / b["cpu_seconds_per_step"] for a, b in pairs]
        name = m if ref == BASELINE else f"{m} vs {ref}"
        for label, d in (("equal steps", steps_d), ("equal CPU time", time_d)):
            rows.append([name, label, ", ".join(f"{x:+.4f}" for x in d),
                         f"{statistics.fmean(d):+.4f}", f"{sum(x < 0 for x in d)}/{len(d)}",
                         f"{statistics.fmean(ratio):.2f}"])
    return markdown_table(["method", "at", "per seed", "mean", "seeds better",
                           "CPU s/step ratio"], rows)


def gap_by_step(by: dict[tuple[str, int], dict[str, Any]], seeds: list[int],
                methods: list[str], ref: str = BASELINE) -> str:
    """Per method: its test loss minus ``ref``'s at each eval step both runs have, the mean
    over the seeds both ran; whether a gap closes with more steps or stays set.

    Example:
        >>> run = lambda *v: {"evals": [{"step": 10 * i, "test": x} for i, x in enumerate(v)]}
        >>> by = {("a", 0): run(4.0, 3.5, 3.2), ("b", 0): run(4.0, 3.0, 3.0)}
        >>> print(gap_by_step(by, [0], ["a", "b"], ref="b"))
        | method | seeds | 10 | 20 |
        | --- | --- | --- | --- |
        | a | 1 | +0.500 | +0.200 |
    """
    rows, steps = [], []
    for m in methods:
        pairs = seed_pairs(by, seeds, m, ref) if m != ref else []
        if not pairs:
            continue
        gaps: dict[int, list[float]] = {}
        for a, b in pairs:
            theirs = {e["step"]: e["test"] for e in b["evals"] if "test" in e}
            for e in a["evals"]:
                if e["step"] > 0 and "test" in e and e["step"] in theirs:
                    gaps.setdefault(e["step"], []).append(e["test"] - theirs[e["step"]])
        common = {k: v for k, v in gaps.items() if len(v) == len(pairs)}
        steps = sorted(set(steps) | set(common))
        rows.append((m, len(pairs), common))
    return markdown_table(["method", "seeds", *map(str, steps)],
                          [[m, str(n), *(f"{statistics.fmean(g[k]):+.3f}" if k in g else ""
                                         for k in steps)] for m, n, g in rows])


def report(rows: list[dict[str, Any]]) -> str:
    budgets = [r for r in rows if r.get("phase") == "budget"]
    chosen = chosen_lrs(rows)
    finals = final_runs(rows)
    out: list[str] = []
    if budgets:
        b = budgets[-1]
        mib = 2**20
        out.append(f"Budget: LoRA all + GC peaks at {b['lora_gc_peak_bytes'] / mib:.1f} MiB "
                   f"(accounted), + {b['margin']:.0%} = **{b['budget_bytes'] / mib:.1f} MiB**; "
                   f"LoRA all without GC: {b['lora_peak_bytes'] / mib:.1f} MiB (does not "
                   f"fit). {b['batch_size']} x {b['seq_len']} tokens, {b['device']}.\n")
    sweeps = [r for r in rows if r.get("phase") == "sweep"]
    if sweeps:
        out.append("Learning-rate sweep (seed 0, validation loss after "
                   f"{sweeps[0]['steps']} steps):\n")
        methods = list(dict.fromkeys(r["method"] for r in sweeps))
        lrs = sorted({r["lr"] for r in sweeps})
        table = [[m] + [next((f"{r['evals'][-1]['val']:.4f}" + (" *" if chosen[m] == lr
                                                                   else "")
                              for r in sweeps if r["method"] == m and r["lr"] == lr), "")
                        for lr in lrs] for m in methods]
        out.append(markdown_table(["method", *[f"{lr:g}" for lr in lrs]], table) + "\n")
    unfit = [r for r in rows if r.get("phase") == "fit" and not r["fits"]]
    if unfit:
        mib = 2**20
        out.append("Not run, cannot fit the budget: " + "; ".join(
            f"`{r['method']}` (its easiest step, the top {len(r['active_layers'])} blocks "
            f"active with {len(r['checkpointed_layers'])} checkpointed, is predicted at "
            f"{r['best_case_peak_bytes'] / mib:.1f} MiB > {r['limit_bytes'] / mib:.1f} MiB, "
            f"the budget less its planning headroom)" for r in unfit) + ".\n")
    if not finals:
        return "\n".join(out)
    order = list(METHODS)
    methods = sorted(dict.fromkeys(r["method"] for r in finals),
                     key=lambda m: order.index(m) if m in order else len(order))
    by = {(r["method"], r["seed"]): r for r in finals}
    seeds = sorted({r["seed"] for r in finals})
    budget = finals[0]["budget_bytes"]
    rows_out = []
    for m in methods:
        runs = [by[m, s] for s in seeds if (m, s) in by]
        peak = max(r["peak_bytes"] for r in runs)
        rows_out.append([
            m, f"{runs[0]['lr']:g}", ", ".join(str(r["seed"]) for r in runs),
            f"{peak / 2**20:.1f}", "yes" if budget is None or peak <= budget else "**no**",
            mean_range([r["cpu_seconds_per_step"] for r in runs], 2),
            "all" if METHODS.get(m, Method("", "", "")).checkpointing == "model" else
            mean_range([statistics.fmean(r["checkpointed_blocks"]) for r in runs], 1),
            mean_range([r["evals"][-1]["test"] for r in runs])])
    steps = finals[0]["steps"]
    out.append(f"At the chosen rates ({steps} steps; peak = the most accounted bytes over "
               "every seed):\n")
    out.append(markdown_table(["method", "lr", "seeds", "peak MiB", "<= budget",
                               "CPU s/step", "blocks checkpointed/step",
                               f"test loss at step {steps}"], rows_out) + "\n")
    if BASELINE in methods:
        out.append(f"Paired test-loss differences vs {BASELINE} (method minus baseline, same "
                   f"seed; negative = better; equal CPU time = the shorter run's total, the "
                   f"other run's loss interpolated there):\n")
        out.append(paired_table(by, seeds, [(m, BASELINE) for m in methods if m != BASELINE])
                   + "\n")
    versus = [(m, peer) for m in methods if METHODS.get(m) is not None
              and METHODS[m].peft == "lora" and METHODS[m].optimizer == "ist"
              and len([s for s in seeds if (m, s) in by]) > 1
              for peer in PEERS if peer in methods]
    if versus:
        out.append("IST with adapters vs the layer-wise peers (the same pairing, "
                   "IST minus peer):\n")
        out.append(paired_table(by, seeds, versus) + "\n")
    if BASELINE in methods:
        worth = []
        for m in methods:
            pairs = seed_pairs(by, seeds, m, BASELINE) if m != BASELINE else []
            if pairs:
                w = [steps_worth(a, b) for a, b in pairs]
                ratio = statistics.fmean(a["cpu_seconds_per_step"] / b["cpu_seconds_per_step"]
                                         for a, b in pairs)
                need = [x / a["steps"] for x, (a, _b) in zip(w, pairs, strict=True)]
                worth.append([m, mean_range(w, 0), mean_range(need, 2), f"{ratio:.2f}"])
        out.append(f"Progress per step: the {BASELINE} step whose test loss equals the "
                   f"method's after {steps} steps, and the CPU s/step ratio to {BASELINE} "
                   f"at which the method would tie at equal time (= that step / {steps}):\n")
        out.append(markdown_table(["method", f"worth {BASELINE} steps", "tie needs ratio <=",
                                   "measured ratio"], worth) + "\n")
        out.append(f"The gap over training: test loss minus {BASELINE}'s at the same step "
                   "(mean over the seeds both ran):\n")
        out.append(gap_by_step(by, seeds, methods) + "\n")
    others = [r for r in rows if r.get("phase") == "final" and r not in finals]
    if others:
        out.append("Finals at a rate other than the method's chosen one (a choice superseded "
                   "by a later sweep, or a check of the choice; not in the tables above), "
                   "against the chosen rate's run on the same seed (differences after "
                   f"{steps} steps, negative = the other rate is better):\n")
        table = []
        for r in others:
            c = by.get((r["method"], r["seed"]))
            d = {k: r["evals"][-1][k] - c["evals"][-1][k] for k in ("val", "test")} if c else {}
            b = by.get((BASELINE, r["seed"]))
            table.append([r["method"], f"{r['lr']:g}", str(r["seed"]),
                          f"{r['evals'][-1]['test']:.4f}", f"{c['lr']:g}" if c else "",
                          f"{c['evals'][-1]['test']:.4f}" if c else "",
                          *(f"{d[k]:+.4f}" if d else "" for k in ("val", "test")),
                          f"{equal_time_gap(r, b):+.4f}" if b else ""])
        out.append(markdown_table(
            ["method", "lr", "seed", f"test loss at step {steps}", "chosen lr",
             "chosen lr's test loss", "difference: validation", "difference: test",
             f"test vs {BASELINE} at equal CPU time"], table) + "\n")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = final_runs(rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for m in dict.fromkeys(r["method"] for r in finals):
        runs = [r for r in finals if r["method"] == m]
        steps = [e["step"] for e in runs[0]["evals"]]
        mean = [statistics.fmean(r["evals"][i]["test"] for r in runs)
                for i in range(len(steps))]
        clock = [statistics.fmean(sum(r["cpu_seconds"][:s]) for r in runs) for s in steps]
        label = f"{m} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        axes[0].plot(steps, mean, marker=".", label=label)
        axes[1].plot(clock, mean, marker=".", label=label)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training CPU seconds")
    axes[0].set_ylabel("test loss (mean over the seeds run)")
    axes[0].set_ylim(top=min(4.6, axes[0].get_ylim()[1]))
    axes[1].legend(fontsize=8)
    fig.suptitle("Inside one memory budget: held-out loss vs steps and vs CPU time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help=f"rates to sweep for every method, as given (default {LR_GRID}, "
                   f"full fine-tuning {FULL_LR_GRID}, extended past an edge that is best; "
                   f"on cuda one rate, 1e-3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="default 200 (cpu), 30 (cuda)")
    p.add_argument("--sweep-steps", type=int, default=50,
                   help="steps of a sweep run; equal to --steps, the sweep on seed 0 also "
                   "serves as the seed-0 final run of the chosen rate (test evals included)")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"],
                   help="rate schedule: constant, or the HF Trainer's linear warm-up then "
                   "linear (its default) or cosine decay to 0 at the run's last step")
    p.add_argument("--warmup", type=float, default=0.1,
                   help="warm-up as a fraction of the run's steps (linear, cosine)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (cpu), 8 (cuda)")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (cpu), 512 (cuda)")
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--margin", type=float, default=0.10)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--rank", type=int, default=8, help="LoRA / DoRA rank")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=OUT_DIR / "runs.jsonl")
    p.add_argument("--max-runs", type=int, default=None)
    p.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSONL")
    p.add_argument("--table", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        rows = read(args.report)
        text = report(rows)
        print(text)
        if args.table:
            args.table.write_text(text + "\n")
        if args.plot:
            plot(rows, args.plot)
        return 0
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    args.steps = args.steps or (30 if cuda else 200)
    args.batch_size = args.batch_size or (8 if cuda else 4)
    args.seq_len = args.seq_len or (512 if cuda else 128)
    args.dtype = torch.bfloat16 if cuda else torch.float32
    grids = {m: tuple(args.lrs) if args.lrs else ((1e-3,) if cuda else lr_grid(m))
             for m in args.methods}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = prepare(args)
    rows = runs_of_schedule(read([args.out]), args.schedule)
    shape = {"device": args.device, "model": args.model, "batch_size": args.batch_size,
             "seq_len": args.seq_len, "margin": args.margin}
    budgets = [r for r in rows if r.get("phase") == "budget"
               and all(r[k] == v for k, v in shape.items())]
    base_model = load_model(args.model, args.dtype).to(args.device)
    base = {s: evaluate(base_model, data.batches(getattr(data, s), args.device))
            for s in ("val", "test")}
    del base_model
    if not budgets:
        budgets = [measure_budget(data, args, base)]
        with args.out.open("a") as f:
            f.write(json.dumps(budgets[0]) + "\n")
    budget = budgets[-1]["budget_bytes"]
    print(f"budget {budget:,} bytes", flush=True)
    fits = {r["method"]: r["fits"] for r in rows if r.get("phase") == "fit"}
    for name in args.methods:
        if METHODS[name].checkpointing == "budget" and name not in fits:
            row = check_fit(name, METHODS[name], args, budget)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            fits[name] = row["fits"]
            print(f"{name}: easiest step predicted at "
                  f"{row['best_case_peak_bytes'] / 2**20:.1f} MiB with blocks "
                  f"{row['checkpointed_layers']} checkpointed: "
                  f"{'fits' if row['fits'] else 'DOES NOT FIT, not run'}", flush=True)
    methods = [m for m in args.methods if fits.get(m, True)]
    done = 0
    while args.max_runs is None or done < args.max_runs:
        rows = runs_of_schedule(read([args.out]), args.schedule)
        left = todo(methods, grids, args.seeds, rows, extend=args.lrs is None and not cuda)
        if not left:
            break
        phase, name, lr, seed = left[0]
        sweep = phase == "sweep"
        full_length = args.sweep_steps == args.steps
        steps = args.sweep_steps if sweep else args.steps
        reuse = [r for r in rows if r.get("phase") == "sweep" and full_length
                 and (r["method"], r["lr"], r["seed"], r["steps"]) == (name, lr, seed, steps)]
        if phase == "final" and reuse:
            # a sweep run at the full length, with test evals, *is* this final run
            row = {**reuse[-1], "from_sweep": True}
        else:
            row = run_one(name, METHODS[name], lr, seed, steps, data, args, budget,
                          eval_every=args.eval_every if full_length or not sweep
                          else args.sweep_steps,
                          splits=("val", "test") if full_length or not sweep else ("val",),
                          base=base)
        row["phase"] = phase
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        last = row["evals"][-1]
        print(f"{phase} {name} lr {lr:g} seed {seed}: " + " ".join(
            f"{k} {v:.4f}" for k, v in last.items() if k != "step")
            + f"; peak {row['peak_bytes'] / 2**20:.1f} MiB"
            f" ({'fits' if row['peak_bytes'] <= budget else 'OVER'}); "
            f"{row['cpu_seconds_per_step']:.2f} CPU s/step", flush=True)
        done += 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
