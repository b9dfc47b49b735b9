"""Quality benchmark: held-out loss of several fine-tuning methods at equal steps and at
equal training time, on a real pretrained model (SmolLM2-135M) and Shakespeare.

Every run reuses the ``ist-finetune`` training code (:func:`ist_optim.cli.run_method`):
a fresh copy of the model, adapters seeded by the run's seed, the same block order for every
method of a seed, and held-out loss every ``--eval-every`` steps on the same held-out batches
(evaluation time is not counted as training time).

Methods are entries of ``METHODS`` (name -> peft method, optimizer kind, ISTOptimizer
keywords); more can be added from the command line, e.g.::

    --add-method 'lora+ist-normalized=lora:ist:{"estimator": "normalized"}'

Run (the configuration of docs/benchmarks.md: one process per seed, in parallel)::

    for seed in 0 1; do OMP_NUM_THREADS=1 python -m benchmarks.quality --seeds $seed \
        --steps 30 --batch-size 4 --seq-len 64 --eval-every 10 --eval-batches 4 \
        --out benchmarks/results/quality/quality-seed$seed.jsonl & done; wait
    python -m benchmarks.quality --report benchmarks/results/quality/quality-seed*.jsonl

Results: one JSON line per run (``--out``) and a Markdown table (``--table``, default
``--out`` as ``.md``); ``--report FILES`` only prints the table of JSONL files (of one
protocol, or one table per ``--group-by`` group), and writes it to ``--table`` when given.
Time is measured two ways: wall time and
the process's CPU time of the training steps. "Equal time" uses CPU time by default
(``--clock cpu``): on a shared machine wall time mostly measures the other tenants.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from ist_optim.cli import CLIError, MethodSpec, prepare_context, run_method

from ..benchkit.protocol import ProtocolMismatch, add_group_by, protocol_groups, report_groups
from ..benchkit.report import markdown_table, mean_range, read_rows

METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec("lora", "lora", "adamw"),
    "lora+ist": MethodSpec("lora+ist", "lora", "ist"),
    "lora+uniform": MethodSpec("lora+uniform", "lora", "ist", {"sampling": "uniform"}),
    "dora": MethodSpec("dora", "dora", "adamw"),
    "dora+ist": MethodSpec("dora+ist", "dora", "ist"),
    # BAdam: full-parameter block coordinate descent over the decoder layers, one layer at a
    # time in descending order, switching every --badam-switch-every steps.
    "badam": MethodSpec("badam", "full", "badam", lr=1e-4),
}
DEFAULT_METHODS = list(METHODS)
OUT_DIR = Path(__file__).resolve().parents[1] / "results" / "quality"


def parse_method(text: str) -> MethodSpec:
    """``NAME=PEFT:OPTIMIZER[:JSON-IST-KWARGS[:LR]]`` -> a MethodSpec."""
    name, sep, rest = text.partition("=")
    parts = rest.split(":", 2)
    if not sep or len(parts) < 2:
        raise argparse.ArgumentTypeError(f"expected NAME=PEFT:OPTIMIZER[:JSON], got {text!r}")
    kwargs = json.loads(parts[2]) if len(parts) == 3 and parts[2] else {}
    lr = kwargs.pop("lr", None) if isinstance(kwargs, dict) else None
    return MethodSpec(name, parts[0], parts[1], kwargs, lr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                   help=f"names from METHODS or --add-method (default: {DEFAULT_METHODS})")
    p.add_argument("--add-method", type=parse_method, action="append", default=[],
                   help="NAME=PEFT:OPTIMIZER[:JSON ISTOptimizer kwargs, may hold \"lr\"]")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--badam-switch-every", type=int, default=5)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--out", type=Path, default=OUT_DIR / "quality.jsonl")
    p.add_argument("--table", type=Path, default=None,
                   help="where the table goes (default: --out as .md; --report: printed only)")
    p.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSONL",
                   help="only build the table of these result files")
    add_group_by(p)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="time used for the equal-time comparison")
    p.add_argument("--progress", action="store_true", help="show a progress bar per run")
    return p


def protocol_of(run: dict[str, Any]) -> dict[str, Hashable]:
    """The protocol fields of a run (:mod:`benchmarks.benchkit.protocol`): its length,
    batch, sequence length, rank, model, data and the steps it was evaluated at.

    Example:
        >>> protocol_of({"steps": 30, "seq_len": 64, "evals": [[0, 0.0, 5.0, 0.0],
        ...                                                    [30, 9.0, 4.0, 8.0]]})
        {'steps': 30, 'seq_len': 64, 'eval_steps': (0, 30)}
    """
    fields: dict[str, Hashable] = {k: run[k] for k in ("steps", "batch_size", "seq_len",
                                                       "rank", "model", "data") if k in run}
    fields["eval_steps"] = tuple(e[0] for e in run["evals"])
    return fields


def run_of(run: dict[str, Any]) -> tuple[str, int]:
    """A run's name: (method, seed)."""
    return run["method"], run["seed"]


def curves(runs: list[dict[str, Any]]) -> str:
    """Markdown: each method's held-out loss at every evaluated step, the mean over its
    seeds.

    Example:
        >>> runs = [{"method": "a", "evals": [[0, 0, 5.0, 0], [10, 1, 4.0, 1]]},
        ...         {"method": "a", "evals": [[0, 0, 5.0, 0], [10, 1, 3.0, 1]]}]
        >>> print(curves(runs))
        | step | a |
        | --- | --- |
        | 0 | 5.0000 |
        | 10 | 3.5000 |
    """
    methods = list(dict.fromkeys(r["method"] for r in runs))
    steps = sorted({e[0] for r in runs for e in r["evals"]})
    cells = {(r["method"], e[0]): [] for r in runs for e in r["evals"]}
    for r in runs:
        for e in r["evals"]:
            cells[r["method"], e[0]].append(e[2])
    return markdown_table(["step", *methods], [
        [str(s), *(f"{statistics.fmean(cells[m, s]):.4f}" if (m, s) in cells else ""
                   for m in methods)] for s in steps])


def _within(run: dict[str, Any], seconds: float, clock: str) -> tuple[int, float]:
    """(step, held-out loss) of the run's last evaluation within ``seconds`` of ``clock``."""
    column = 3 if clock == "cpu" else 1
    reached = [(e[0], e[2]) for e in run["evals"] if e[column] <= seconds + 1e-9]
    return reached[-1] if reached else (0, math.nan)


def report(runs: list[dict[str, Any]], clock: str = "cpu") -> str:
    """Markdown: per method, held-out loss at equal steps and at equal training time.

    Equal time: for each seed, the budget is the shortest total training time (``clock``:
    CPU or wall) of any method on that seed; each method's loss is its last evaluation
    within that budget.
    """
    total = "train_cpu_seconds" if clock == "cpu" else "train_seconds"
    methods = list(dict.fromkeys(r["method"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    budget = {s: min(r[total] for r in runs if r["seed"] == s) for s in seeds}
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        reached = [_within(r, budget[r["seed"]], clock) for r in mine]
        at_time = [loss for _step, loss in reached]
        step_at_time = [step for step, _loss in reached]
        rows.append([
            method, len(mine),
            mean_range([r["val_loss_before"] for r in mine]),
            mean_range([r["val_loss_after"] for r in mine]),
            mean_range(at_time),
            mean_range([float(s) for s in step_at_time], 0),
            mean_range([r["cpu_seconds_per_step"] for r in mine], 2),
            mean_range([r["seconds_per_step"] for r in mine], 2),
            mean_range([r["optimizer_state_bytes"] / 2**20 for r in mine], 1),
            mean_range([r["peak_bytes"] / 2**20 for r in mine], 0),
            mean_range([(r.get("sampling_spread") or {}).get("max_min_ratio", math.nan)
                         for r in mine], 3),
        ])
    steps = sorted({r["steps"] for r in runs})
    header = ["method", "seeds", "held-out loss at step 0", f"held-out loss at step {steps[-1]}",
              f"held-out loss at equal {clock} time", "steps reached in that time",
              "CPU s/step", "wall s/step",
              "optimizer state MiB", f"{runs[0]['memory_kind']} MiB",
              "sampling max/min at the end"]
    budgets = ", ".join(f"seed {s}: {b:.0f} s" for s, b in budget.items())
    return (markdown_table(header, rows)
            + f"\n\nMean (min-max) over seeds. Equal-time budget per seed = the fastest "
              f"method's training {clock} time ({budgets}).\n"
            + "\nHeld-out loss at each evaluated step, mean over seeds:\n\n"
            + curves(runs) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = dict(METHODS)
    methods.update({m.name: m for m in args.add_method})
    if args.report:
        try:
            groups = protocol_groups(read_rows(args.report), protocol_of, args.group_by,
                                     run_of)
        except ProtocolMismatch as err:
            print(f"python -m benchmarks.quality: error: {err}", file=sys.stderr)
            return 2
        text = report_groups(groups, lambda runs: report(runs, args.clock).rstrip("\n"))
        if args.table:
            args.table.parent.mkdir(parents=True, exist_ok=True)
            args.table.write_text(text + "\n")
        print(text)
        return 0
    unknown = [m for m in args.methods if m not in methods]
    if unknown:
        print(f"python -m benchmarks.quality: error: unknown methods {unknown}; known: "
              f"{list(methods)}",
              file=sys.stderr)
        return 2
    try:
        context = prepare_context(args.model, args.data, val_fraction=0.1,
                                  seq_len=args.seq_len, batch_size=args.batch_size,
                                  eval_batches=args.eval_batches, rank=args.rank,
                                  badam_switch_every=args.badam_switch_every,
                                  progress=args.progress)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table = args.table or args.out.with_suffix(".md")
        table.parent.mkdir(parents=True, exist_ok=True)
        runs = []
        started = time.perf_counter()
        with args.out.open("w") as handle:
            for seed in args.seeds:
                for name in args.methods:
                    run = run_method(methods[name], context, steps=args.steps, seed=seed,
                                     eval_every=args.eval_every)
                    summary = run.summary()
                    summary.update(batch_size=args.batch_size, seq_len=args.seq_len,
                                   rank=args.rank, model=args.model, data=args.data)
                    runs.append(summary)
                    handle.write(json.dumps(summary) + "\n")
                    handle.flush()
                    print(f"[{time.perf_counter() - started:6.0f} s] seed {seed} {name}: "
                          f"held-out {summary['val_loss_before']:.4f} -> "
                          f"{summary['val_loss_after']:.4f}, "
                          f"{summary['cpu_seconds_per_step']:.2f} CPU s/step, "
                          f"{summary['seconds_per_step']:.2f} wall s/step", flush=True)
    except CLIError as err:
        print(f"python -m benchmarks.quality: error: {err}", file=sys.stderr)
        return 2
    table.write_text(report(runs, args.clock))
    print(table.read_text())
    return 0

