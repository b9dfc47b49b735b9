"""What ``ist-finetune plan`` recommends at each budget for one model shape: the planner's
side of the frontier, for shapes no CPU can train (the 7B rows of docs/benchmarks.md and
the README's decision table).

For each budget, :func:`ist_optim.cli.plan.plan` (the rows ``ist-finetune plan`` prints)
and from them, as ``plan`` names them: the fastest set-up that fits, the fastest that
trains every layer each step, and LoRA on every layer with checkpointing and under
``memory_budget`` (predicted step times relative to LoRA on every layer without
checkpointing; the blocks it checkpoints)::

    python -m benchmarks.frontier.decisions --model llama-2-7b --device h200 \\
        --budgets 16GiB 20GiB 24GiB 32GiB 40GiB 48GiB

Example:
    >>> _trained("LoRA r32, all layers, 24.0 checkpointed")
    '24.0'
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

from ist_optim.cli.plan import EVERY_LAYER_ROWS, PlanRow, fastest, parse_budget, plan
from ist_optim.planner.shapes import load_config

from ..benchkit.report import markdown_table


def _trained(text: str) -> str:
    """The checkpointed-block count a budget row's "trains" text gives."""
    found = re.search(r"([0-9.]+) checkpointed", text)
    return found.group(1) if found else "-"


def _named(base: float, among: Sequence[PlanRow]) -> str:
    """The fastest of ``among`` as ``plan`` names it (:func:`ist_optim.cli.plan.fastest`)."""
    best = fastest(among)
    if best is None:
        return "nothing fits"
    return f"{best.name} ({best.seconds / base:.2f}x)"


def decisions(model: str, budgets: Sequence[str], *, batch_size: int, seq_len: int,
              device: str) -> str:
    """The Markdown table of the recommendations at each budget."""
    config = load_config(model)
    table = []
    for text in budgets:
        budget = parse_budget(text)
        rows = plan(config, batch_size=batch_size, seq_len=seq_len, budget=budget,
                    targets=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
                    device=device)
        by = {r.name: r for r in rows}
        base = by["LoRA all"].seconds
        fitting = [r for r in rows if r.fits]
        gc, lb = by["LoRA all + GC"], by["LoRA all, budget"]
        table.append([text, _named(base, fitting),
                      _named(base, [r for r in fitting if r.name in EVERY_LAYER_ROWS]),
                      f"{gc.seconds / base:.2f}x" if gc.fits else "does not fit",
                      f"{lb.seconds / base:.2f}x, {_trained(lb.trains)} blocks"
                      if lb.fits else "does not fit"])
    return markdown_table(["budget", "fastest that fits", "fastest, every layer each step",
                           "LoRA all + GC", "LoRA all, budget"], table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.frontier.decisions",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--budgets", nargs="+", required=True, metavar="SIZE")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--device", default="h200")
    args = p.parse_args(argv)
    print(decisions(args.model, args.budgets, batch_size=args.batch_size,
                    seq_len=args.seq_len, device=args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
