"""Running the budget benchmark: the data, the model and optimizer of a method, one
measured run, the budgets themselves (the peak of LoRA + GC plus the margin; the QLoRA
budget, the same from QLoRA + GC), the check that a method can fit its budget at all (a
budgeted IST method's easiest step planned; a GaLore / APOLLO method's first steps
measured, the planner's figure beside them), and the loop over the runs left
(:mod:`benchmarks.budget.plan`) that appends each row to ``--out`` as it ends.

Each run is :func:`run_one`: a fresh model, the same batches for every method of a seed,
the peak of its steps (:class:`StepPeaks`), the CPU and wall time of every step, and the
held-out losses every ``eval_every`` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ist_optim import ISTOptimizer, account_step
from ist_optim.cli import (
    block_batches,
    build_scheduler,
    load_documents,
    load_model,
    load_tokenizer,
    resolve_model_dir,
)
from ist_optim.memory import PeakMemory
from ist_optim.memory.budget import planner_for_model

from ..benchkit.data import heldout_loss, pick_blocks, split_plays, token_stream
from ..benchkit.models import build_optimizer, pretrained
from ..benchkit.report import append_row, read_rows
from .methods import BASELINE, METHODS, Method, budget_of, fit_check, lr_grid
from .plan import runs_of_schedule, todo, unclaimed


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    """The token data of every run: the training plays as one stream, validation and test
    blocks (whole plays the training never sees), and the batch size of their losses."""

    train: torch.Tensor  # one token stream (training plays)
    val: torch.Tensor  # blocks
    test: torch.Tensor  # blocks
    eval_batch: int

    def loss(self, model: Any, split: str, device: str) -> float:
        """The model's mean loss on ``split`` (``"val"`` or ``"test"``)."""
        return heldout_loss(model, getattr(self, split), self.eval_batch, device)


def prepare(args: argparse.Namespace) -> Data:
    """The plays of ``--data`` split as in the few-data benchmark (2 validation plays, the test
    plays ``ist-finetune`` holds out), tokenized with ``--model``'s tokenizer."""
    docs = load_documents(args.data)
    train_i, val_i, test_i = split_plays([d.name for d in docs], 0.1, 2)
    tokenizer = load_tokenizer(args.model)

    def stream(idx: list[int]) -> torch.Tensor:
        return token_stream(tokenizer, [docs[i].text for i in idx])

    return Data(stream(train_i), pick_blocks(stream(val_i), args.seq_len, args.eval_blocks),
                pick_blocks(stream(test_i), args.seq_len, args.eval_blocks), args.eval_batch)


def base_losses(data: Data, args: argparse.Namespace, quantize: str = "none"
                ) -> dict[str, float]:
    """The untrained model's validation and test losses: step 0 of every run (LoRA starts
    with B = 0, full fine-tuning from the same weights); ``quantize="4bit"``: of the 4-bit
    base, step 0 of the QLoRA runs."""
    if quantize == "none":
        base_model = load_model(args.model, args.dtype).to(args.device)
    else:
        base_model = load_model(args.model, args.dtype, quantize=quantize, device=args.device)
    return {s: data.loss(base_model, s, args.device) for s in ("val", "test")}


# --------------------------------------------------------------------------- measuring
class StepPeaks:
    """The highest peak of a run's steps: on CUDA every step's, read by
    :class:`ist_optim.memory.PeakMemory` on the model's device; on the CPU the exact tensor
    bytes of :func:`ist_optim.account_step` on the steps :meth:`wants` chooses (accounting
    slows a step)."""

    def __init__(self, device: str, model: torch.nn.Module, optimizer: Any) -> None:
        self.device, self.model, self.optimizer = device, model, optimizer
        self.meter = PeakMemory(device)
        self.peak = 0
        self.accounted: list[int] = []
        self._highest_prediction = -1

    def wants(self, step: int, predicted: int | None) -> bool:
        """Whether to account ``step`` (CPU only): steps 1 and 2, every 10th, and every step
        whose predicted peak (IST's ``memory_report``) is the highest so far."""
        if self.device != "cpu":
            return False
        new_high = predicted is not None and predicted > self._highest_prediction
        if predicted is not None:
            self._highest_prediction = max(self._highest_prediction, predicted)
        return step <= 2 or step % 10 == 0 or new_high

    def run(self, step: int, one_step: Callable[[], None], predicted: int | None) -> bool:
        """Run the step (accounted if chosen); returns whether it was accounted."""
        if self.meter.cuda:
            self.meter.reset()
            one_step()
            self.meter.synchronize()
            self.peak = max(self.peak, self.meter.peak_bytes())
            return False
        if not self.wants(step, predicted):
            one_step()
            return False
        peak = account_step(one_step, model=self.model, optimizer=self.optimizer).peak_bytes
        self.peak = max(self.peak, peak)
        self.accounted.append(step)
        return True


def gradient_checkpointing(model: Any) -> None:
    """The model's own (non-reentrant) gradient checkpointing on every block."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build(method: Method, lr: float, seed: int, args: argparse.Namespace,
          budget: int | None) -> tuple[torch.nn.Module, Any]:
    """The model (adapters added, checkpointing set up) and the optimizer of ``method``."""
    model = pretrained(args.model, method.peft, rank=args.rank, seed=seed, dtype=args.dtype,
                       device=args.device)
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
    return {"phase": "fit", "method": name, "device": args.device, "budget_of": budget_of(name),
            "budget_bytes": budget, "limit_bytes": policy.limit, "active_layers": top,
            "best_case_peak_bytes": decision.peak_bytes,
            "checkpointed_layers": decision.checkpointed, "fits": decision.fits}


#: Steps of the measured fit check (both accounted; the first recomputes GaLore's and
#: APOLLO's projectors, the step a budget must hold).
FIT_STEPS = 2


def planned_peak(method: Method, args: argparse.Namespace, optimizer: str | None = None
                 ) -> int:
    """The planner's peak (:func:`ist_optim.estimate_peak_memory`) of full fine-tuning of
    every block with ``optimizer`` (default ``method.optimizer``) and checkpointing on
    every block, the loop keeping only the loss, at the run's shape; a step that
    recomputes the projectors."""
    from transformers import AutoConfig

    from ist_optim import estimate_peak_memory

    config = AutoConfig.from_pretrained(resolve_model_dir(args.model))
    return estimate_peak_memory(config, batch_size=args.batch_size, seq_len=args.seq_len,
                                dtype=args.dtype, method=method.peft,
                                optimizer=optimizer or method.optimizer,
                                gradient_checkpointing=True, keep_logits=False).peak_bytes


def check_measured_fit(name: str, method: Method, data: Data, args: argparse.Namespace,
                       budget: int, base: dict[str, float]) -> dict[str, Any]:
    """Whether a full-parameter method with a gradient-projection optimizer (GaLore,
    APOLLO; the model's checkpointing) fits the budget: its peak over :data:`FIT_STEPS`
    accounted steps at the grid's highest rate on seed 0, against the budget itself (its
    checkpointing is fixed: no planning headroom). Beside it the planner's figure of the
    same step, and of its layer-wise form (the HF Trainer's ``*_layerwise``: one optimizer
    per parameter, stepped as its gradient is accumulated, which frees it), which this
    benchmark does not run."""
    run = run_one(name, method, max(lr_grid(name)), 0, FIT_STEPS, data, args, budget,
                  eval_every=10**9, splits=(), base=base)
    return {"phase": "fit", "method": name, "device": args.device, "budget_of": budget_of(name),
            "budget_bytes": budget, "limit_bytes": budget,
            "measured_peak_bytes": run["peak_bytes"], "measured_steps": FIT_STEPS,
            "measured_cpu_seconds_per_step": run["cpu_seconds_per_step"],
            "planned_peak_bytes": planned_peak(method, args),
            "planned_layerwise_peak_bytes": planned_peak(method, args,
                                                         f"{method.optimizer}-layerwise"),
            "fits": run["peak_bytes"] <= budget}


def run_one(name: str, method: Method, lr: float, seed: int, steps: int, data: Data,
            args: argparse.Namespace, budget: int | None, *, eval_every: int,
            splits: tuple[str, ...], base: dict[str, float]) -> dict[str, Any]:
    """Train ``method`` (called ``name``) at ``lr`` for ``steps`` steps inside ``budget``
    (the budget of :func:`benchmarks.budget.methods.budget_of`; None: unbudgeted, to
    measure the budget itself)."""
    device = args.device
    model, optimizer = build(method, lr, seed, args, budget)
    ist = optimizer if isinstance(optimizer, ISTOptimizer) else None
    model.train()
    batches = block_batches(data.train, args.seq_len, args.batch_size,
                            generator=torch.Generator().manual_seed(seed))
    scheduler = lr_schedule(optimizer, args.schedule, steps, args.warmup)
    meter = StepPeaks(device, model, optimizer)
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
            evals.append({"step": step, **{s: data.loss(model, s, device) for s in splits}})
    if ist is not None:
        ist.close()
    cpu_fair, cpu_per_step = fair_times(cpu, accounted)
    wall_fair, wall_per_step = fair_times(wall, accounted)
    row = {"method": name, "lr": lr, "seed": seed, "steps": steps, "device": device,
           "schedule": args.schedule, "warmup": args.warmup,
           "batch_size": args.batch_size, "seq_len": args.seq_len, "model": args.model,
           "budget_bytes": budget, "peak_bytes": meter.peak, "accounted_steps": meter.accounted,
           "cpu_seconds": cpu_fair, "wall_seconds": wall_fair,
           "cpu_seconds_per_step": cpu_per_step,
           "wall_seconds_per_step": wall_per_step,
           "checkpointed_blocks": checkpointed, "train_losses": losses, "evals": evals}
    return row


def fair_times(seconds: list[float], accounted: list[bool]) -> tuple[list[float], float]:
    """(every step's time with each accounted step's replaced by the mean of the others,
    that mean): accounting slows a step, so it would bias the equal-time comparison.

    Example:
        >>> fair_times([3.0, 1.0, 2.0], [True, False, False])
        ([1.5, 1.0, 2.0], 1.5)
    """
    plain = [t for t, a in zip(seconds, accounted, strict=True) if not a] or seconds
    mean = statistics.fmean(plain)
    return [mean if a else t for t, a in zip(seconds, accounted, strict=True)], mean


def lr_schedule(optimizer: Any, kind: str, steps: int, warmup: float) -> Any:
    """The rate schedule a user of the HF Trainer runs (``ist-finetune``'s
    :func:`ist_optim.cli.build_scheduler`): ``"linear"`` (the Trainer's default: linear
    warm-up over ``warmup`` of the steps, then linear decay to 0 at ``steps``) or
    ``"cosine"`` (the same warm-up, then cosine decay to 0); ``"constant"``: None, the rate
    as set, no warm-up (the protocol of the first budget tables)."""
    return build_scheduler(optimizer, kind, total_steps=steps,
                           warmup_steps=0 if kind == "constant" else round(warmup * steps))


def measure_budget(data: Data, args: argparse.Namespace, base: dict[str, float],
                   of: str = BASELINE) -> dict[str, Any]:
    """The budget: the peak of ``of`` (``lora+gc``, or ``qlora+gc`` for the QLoRA budget)
    plus the margin; the same adapters without checkpointing must exceed it. The row's
    peaks are named after the peft kind (``lora_gc_peak_bytes``, ``lora_peak_bytes``;
    ``qlora_gc_peak_bytes``, ...)."""
    peft = METHODS[of].peft
    measured = {name: run_one(name, method, 1e-3, 0, 3, data, args, None, eval_every=10**9,
                              splits=(), base=base)
                for name, method in ((of, METHODS[of]), (peft, Method(peft, "adamw", "none")))}
    gc, plain = measured[of], measured[peft]
    budget = int(gc["peak_bytes"] * (1 + args.margin))
    if plain["peak_bytes"] <= budget:
        raise SystemExit(f"{peft} without checkpointing peaks at {plain['peak_bytes']:,} "
                         f"bytes, within the budget {budget:,} of {of}: lower --margin")
    return {"phase": "budget", "budget_of": of, "device": args.device, "model": args.model,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "margin": args.margin,
            f"{peft}_gc_peak_bytes": gc["peak_bytes"], f"{peft}_peak_bytes": plain["peak_bytes"],
            "budget_bytes": budget,
            f"{peft}_gc_cpu_seconds_per_step": gc["cpu_seconds_per_step"],
            f"{peft}_cpu_seconds_per_step": plain["cpu_seconds_per_step"]}


# --------------------------------------------------------------------------- the runs
def ensure_budget(rows: list[dict[str, Any]], data: Data, args: argparse.Namespace,
                  base: dict[str, float], of: str = BASELINE) -> int:
    """The budget set by ``of`` in bytes: the last budget row of ``rows`` of that baseline
    (rows without ``budget_of`` are ``lora+gc``'s) measured at this shape (device, model,
    batch, margin), else measured now (:func:`measure_budget`) and appended to ``--out``."""
    shape = {"device": args.device, "model": args.model, "batch_size": args.batch_size,
             "seq_len": args.seq_len, "margin": args.margin}
    budgets = [r for r in rows if r.get("phase") == "budget"
               and r.get("budget_of", BASELINE) == of
               and all(r[k] == v for k, v in shape.items())]
    if not budgets:
        budgets = [measure_budget(data, args, base, of)]
        append_row(args.out, budgets[0])
    return budgets[-1]["budget_bytes"]


def ensure_budgets(rows: list[dict[str, Any]], data: Data, args: argparse.Namespace,
                   base: dict[str, float]) -> dict[str, int]:
    """The budget of every method of ``--methods`` (:func:`benchmarks.budget.methods.budget_of`):
    {method: bytes}, each budget read or measured once (:func:`ensure_budget`)."""
    of = {name: budget_of(name) for name in args.methods}
    budgets = {b: ensure_budget(rows, data, args, base, b) for b in dict.fromkeys(of.values())}
    for b, size in budgets.items():
        print(f"budget of {b}: {size:,} bytes", flush=True)
    return {name: budgets[b] for name, b in of.items()}


def ensure_fits(rows: list[dict[str, Any]], args: argparse.Namespace,
                budgets: dict[str, int], data: Data | None = None,
                base: dict[str, float] | None = None) -> dict[str, bool]:
    """Per method of ``--methods`` with a fit check (:func:`benchmarks.budget.methods.fit_check`),
    whether it can fit its budget (``budgets``: {method: bytes}): the fit row of ``rows``,
    else :func:`check_fit` (planned) or :func:`check_measured_fit` (measured on ``data``)
    now, the row appended to ``--out`` and the verdict printed."""
    fits = {r["method"]: r["fits"] for r in rows if r.get("phase") == "fit"}
    for name in args.methods:
        kind = fit_check(name)
        if kind is None or name in fits:
            continue
        if kind == "plan":
            row = check_fit(name, METHODS[name], args, budgets[name])
            how = (f"easiest step predicted at {row['best_case_peak_bytes'] / 2**20:.1f} MiB "
                   f"with blocks {row['checkpointed_layers']} checkpointed")
        else:
            row = check_measured_fit(name, METHODS[name], data, args, budgets[name],
                                     base or {})
            how = (f"measured at {row['measured_peak_bytes'] / 2**20:.1f} MiB over "
                   f"{row['measured_steps']} steps (planner: "
                   f"{row['planned_peak_bytes'] / 2**20:.1f} MiB; layer-wise "
                   f"{row['planned_layerwise_peak_bytes'] / 2**20:.1f} MiB), budget "
                   f"{row['budget_bytes'] / 2**20:.1f} MiB, "
                   f"{row['measured_cpu_seconds_per_step']:.2f} CPU s/step")
        append_row(args.out, row)
        fits[name] = row["fits"]
        print(f"{name}: {how}: {'fits' if row['fits'] else 'DOES NOT FIT, not run'}",
              flush=True)
    return fits


#: Seconds between looks at ``--out`` while every run left is held by another process.
CLAIM_POLL_SECONDS = 30.0


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (``fcntl.flock`` on ``<out>.lock``) while reading
    what is left and claiming a run, so that several processes can share one ``--out``
    (each run goes to exactly one of them; see :func:`run_pending`)."""
    with open(f"{out}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim_alive(row: dict[str, Any]) -> bool:
    """Whether the process of a claim row may still be running: on this host, whether its
    pid exists; a claim from another host counts as live (delete its line from ``--out``
    if that machine's run was lost)."""
    if row.get("host") != socket.gethostname():
        return True
    try:
        os.kill(row["pid"], 0)  # PermissionError: alive, another user's process
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def claim_row(phase: str, name: str, lr: float, seed: int, args: argparse.Namespace
              ) -> dict[str, Any]:
    """The row that tells other processes on ``--out`` this one runs (phase, name, lr, seed)."""
    return {"phase": "claim", "run_phase": phase, "method": name, "lr": lr, "seed": seed,
            "schedule": args.schedule, "host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_pending(methods: list[str], grids: dict[str, tuple[float, ...]], data: Data,
                args: argparse.Namespace, budgets: dict[str, int], base: dict[str, float]
                ) -> None:
    """Run what :func:`benchmarks.budget.plan.todo` says is left (at most ``--max-runs``), rereading
    ``--out`` before each run and appending each row as the run ends; each method inside
    its budget (``budgets``: {method: bytes}), its step 0 the untrained model's losses
    (``base``; a 4-bit base's own, measured once, for the QLoRA methods). A final run of
    the length of the sweep reuses the sweep run of its rate and seed (it has the test
    evals).

    Several processes may run this on one ``--out`` at once: under :func:`out_lock` each
    takes the first run no live claim holds and appends its claim row; where every run
    left is held (the finals wait for the sweeps), it looks again every
    :data:`CLAIM_POLL_SECONDS`. A killed process's claims lapse with it."""
    cuda = args.device == "cuda"
    done = 0
    step0 = {"none": base}
    waiting = None
    while args.max_runs is None or done < args.max_runs:
        with out_lock(args.out):
            rows = runs_of_schedule(read_rows([args.out]), args.schedule)
            left = todo(methods, grids, args.seeds, rows, extend=args.lrs is None and not cuda)
            free = unclaimed(left, rows, claim_alive)
            if free:
                append_row(args.out, claim_row(*free[0], args))
        if not left:
            break
        if not free:
            if waiting != left:
                print(f"waiting: every run left ({len(left)}, e.g. {left[0]}) is held by "
                      "another process", flush=True)
                waiting = left
            time.sleep(CLAIM_POLL_SECONDS)
            continue
        waiting = None
        phase, name, lr, seed = free[0]
        sweep = phase == "sweep"
        full_length = args.sweep_steps == args.steps
        steps = args.sweep_steps if sweep else args.steps
        reuse = [r for r in rows if r.get("phase") == "sweep" and full_length
                 and (r["method"], r["lr"], r["seed"], r["steps"]) == (name, lr, seed, steps)]
        if phase == "final" and reuse:
            # a sweep run at the full length, with test evals, *is* this final run
            row = {**reuse[-1], "from_sweep": True}
        else:
            quantize = "4bit" if METHODS[name].peft == "qlora" else "none"
            if quantize not in step0:
                step0[quantize] = base_losses(data, args, quantize)
            row = run_one(name, METHODS[name], lr, seed, steps, data, args, budgets[name],
                          eval_every=args.eval_every if full_length or not sweep
                          else args.sweep_steps,
                          splits=("val", "test") if full_length or not sweep else ("val",),
                          base=step0[quantize])
        row["phase"] = phase
        append_row(args.out, row)
        last = row["evals"][-1]
        print(f"{phase} {name} lr {lr:g} seed {seed}: " + " ".join(
            f"{k} {v:.4f}" for k, v in last.items() if k != "step")
            + f"; peak {row['peak_bytes'] / 2**20:.1f} MiB"
            f" ({'fits' if row['peak_bytes'] <= budgets[name] else 'OVER'}); "
            f"{row['cpu_seconds_per_step']:.2f} CPU s/step", flush=True)
        done += 1
