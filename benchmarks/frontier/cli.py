"""The memory-time frontier on CPU: at budgets from LoRA + GC's peak (+ the margin) to
LoRA's peak without checkpointing, the step time of every way to fit each budget, measured
side by side, and each method's held-out loss at a fixed CPU time.

Protocol (SmolLM2-135M, the budget study's Shakespeare data, 4 x 128 tokens, float32): the
accounted peaks of ``lora+gc``, LoRA without checkpointing and ``apollo-mini+gc`` (a
``{"phase": "peaks"}`` row, measured as the budget study measures its budget), then
``--num-budgets`` budgets evenly spaced from LoRA + GC's peak + ``--margin`` to LoRA's peak
(or ``--budgets``). At each budget, each method of ``--methods`` that fits
(:mod:`.run`: a ``{"phase": "fit"}`` row per method and budget) is built once and the
methods are stepped interleaved in one process (:mod:`.timing`): ``--warmup-steps`` steps
each (not counted; the last accounted for its peak), then ``--rounds`` rounds of
``--per-turn`` counted steps each. A ``{"phase": "time"}`` row per method and budget keeps
every counted step's CPU (``time.process_time``) and wall seconds and the blocks it
checkpointed. Rows go to ``--out`` as each budget ends; a rerun skips the fits and times
already there. ``--part I/N`` times every N-th budget from the I-th, for N processes side
by side (each its own ``--out``; the accounted peaks are exact tensor bytes, so each
process measures the same ones and the same budgets).

``--report`` builds the tables and ``--plot`` the figure (:mod:`.report`) from the rows of
the given files and the budget study's per-step curves (``--curves``)::

    OMP_NUM_THREADS=1 python -m benchmarks.frontier
    python -m benchmarks.frontier --report benchmarks/results/frontier/runs.jsonl \\
        --table benchmarks/results/frontier/frontier.md \\
        --plot benchmarks/results/frontier/frontier.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..benchkit.report import append_row, read_rows
from ..budget.run import prepare
from .budgets import MIB, parse_budgets, spaced_budgets
from .methods import NAMES
from .report import plot, report
from .run import measure_peaks, run_budgets, shape_of

RESULTS = Path(__file__).resolve().parents[1] / "results"
OUT_DIR = RESULTS / "frontier"
#: The budget study's runs under the linear schedule whose curves the report reads.
CURVES = [RESULTS / "budget" / "linear" / f for f in
          ("runs-lora.jsonl", "runs-ngrid.jsonl", "runs-projected.jsonl")]


def part(text: str) -> tuple[int, int]:
    """``--part I/N``: (I, N), 1 <= I <= N.

    Example:
        >>> part("2/3")
        (2, 3)
    """
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 1/2") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= I <= N")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.frontier``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.frontier",
                                description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(NAMES), choices=list(NAMES))
    p.add_argument("--budgets", nargs="+", default=None, metavar="SIZE",
                   help="budgets to time, each with a unit ('950MiB', '1.2GiB'); default "
                   "--num-budgets of them from LoRA + GC's peak + --margin to LoRA's peak")
    p.add_argument("--num-budgets", type=int, default=6)
    p.add_argument("--part", type=part, default=(1, 1), metavar="I/N",
                   help="time only budgets I, I+N, I+2N, ... (1-based) of the list: N "
                   "processes side by side, each with its own --out")
    p.add_argument("--margin", type=float, default=0.10)
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="uncounted steps of each method first (at least 1; the last is "
                   "accounted for the method's peak, after the first built its state)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-turn", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default="shakespeare")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--out", type=Path, default=OUT_DIR / "runs.jsonl")
    p.add_argument("--report", nargs="+", type=Path, default=None, metavar="JSONL")
    p.add_argument("--curves", nargs="+", type=Path, default=CURVES, metavar="JSONL",
                   help="the budget study's rows whose per-step curves the report reads")
    p.add_argument("--at-seconds", type=float, default=None,
                   help="the CPU time of the loss table (default: the shortest whole run)")
    p.add_argument("--measure-device", type=Path, default=None, metavar="JSONL",
                   help="measure this CPU (one thread: matrix products and copies) for the "
                   "report's predicted step times, append the row to JSONL and stop; run "
                   "it alone, as the timing runs")
    p.add_argument("--table", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    return p


def write_report(args: argparse.Namespace) -> None:
    """``--report``: print the report, write it to ``--table`` and the figure to ``--plot``."""
    rows, curves = read_rows(args.report), read_rows(args.curves)
    text = report(rows, curves, args.at_seconds)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")
    if args.plot:
        plot(rows, curves, args.plot, args.at_seconds)


def main(argv: list[str] | None = None) -> int:
    """Run the frontier (or only its report) as the command line asks; 0 when done."""
    args = build_parser().parse_args(argv)
    if args.measure_device:
        from .predict import device_row

        row = device_row(threads=1)
        append_row(args.measure_device, row)
        print(f"{row['name']}: {row['flops_per_second'] / 1e9:.1f} GFLOP/s, "
              f"{row['bytes_per_second'] / 1e9:.1f} GB/s")
        return 0
    if args.report:
        write_report(args)
        return 0
    if args.warmup_steps < 1:
        raise SystemExit("--warmup-steps must be at least 1 (a warm-up step is accounted)")
    args.device, args.dtype = "cpu", torch.float32
    args.schedule, args.warmup = "constant", 0.0  # what benchmarks.budget.run.run_one reads
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = prepare(args)
    rows = read_rows([args.out])
    shape = shape_of(args)
    peaks = next((r for r in reversed(rows) if r.get("phase") == "peaks"
                  and all(r.get(k) == v for k, v in shape.items())), None)
    if peaks is None:
        peaks = measure_peaks(data, args)
        append_row(args.out, peaks)
    if args.budgets:
        budgets = parse_budgets(args.budgets)
    else:
        budgets = spaced_budgets(int(peaks["lora+gc_peak_bytes"] * (1 + args.margin)),
                                 peaks["lora_peak_bytes"], args.num_budgets)
    print("budgets: " + ", ".join(f"{b / MIB:.1f} MiB" for b in budgets), flush=True)
    i, n = args.part
    budgets = budgets[i - 1::n]
    run_budgets(budgets, rows, peaks, data, args)
    return 0
