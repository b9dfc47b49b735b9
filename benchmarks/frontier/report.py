"""The report of the frontier: per budget, each method's median step CPU time and its ratio
to ``lora+gc`` at that budget, the blocks it checkpointed, ``lora+budget`` against its
ideal time, and each method's held-out test loss at a fixed CPU time; one plot of both
against the budget.

The ideal time of a budget (:func:`ideal_time`): LoRA's step without checkpointing plus
the recomputation of exactly the blocks the budget forces
(:func:`benchmarks.frontier.budgets.forced_blocks`), each costing ``(lora+gc - lora) /
layers``, both medians measured at the loosest budget timed where both ran (``lora``
fits only there, and recomputation costs the same at every budget).

The loss at CPU time T (:func:`loss_at_time`): each method's per-step test-loss curves of
the budget study (its :data:`~benchmarks.frontier.methods.CURVE_OF` run, linear schedule,
every seed; the loss per step does not depend on the budget) on a clock of this budget's
step times, interpolated between eval points as the study's equal-CPU-time comparison does
(:func:`benchmarks.budget.report.at_time`), the mean over the seeds. T is one time for every
budget: by default the shortest 200-step run of any method at any budget, so that every
curve reaches it.

Example:
    >>> round(ideal_time(3.6, 4.8, forced=10, layers=30), 3)
    4.0
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..benchkit.report import markdown_table
from ..budget.plan import final_runs
from ..budget.report import at_time
from .budgets import MIB, forced_blocks
from .methods import BASELINE, CURVE_OF, NAMES, phase_steps

#: (budget bytes, method) -> its time row.
Times = dict[tuple[int, str], dict[str, Any]]


def ideal_time(plain: float, gc: float, *, forced: int, layers: int) -> float:
    """A step's time with exactly ``forced`` blocks recomputed: the step without
    checkpointing (``plain``) plus ``forced`` times the per-block recomputation cost
    ``(gc - plain) / layers``."""
    return plain + forced * (gc - plain) / layers


def excess(measured: float, ideal: float) -> float:
    """``measured`` over ``ideal``, in percent (+5.0: 5% slower than ideal).

    Example:
        >>> round(excess(4.2, 4.0), 6)
        5.0
    """
    return (measured / ideal - 1.0) * 100.0


def median_cpu(row: dict[str, Any]) -> float:
    """A time row's median step CPU seconds (robust to a slow step of a shared machine;
    IST's sparse steps vary with the draw, so give them enough counted steps)."""
    return statistics.median(row["cpu_seconds"])


def times_of(rows: list[dict[str, Any]]) -> Times:
    """The time rows by (budget, method); a later row of the same pair replaces an earlier."""
    return {(r["budget_bytes"], r["method"]): r for r in rows if r.get("phase") == "time"}


def clock(name: str, budget: int, times: Times, steps: int) -> list[float] | None:
    """The CPU seconds of each of ``steps`` steps of ``name``'s curve at ``budget`` (the IST
    recipe: its dense steps at ``lora+budget``'s time), None where a phase was not timed."""
    out: list[float] = []
    for timed, count in phase_steps(name, steps).items():
        if (budget, timed) not in times:
            return None
        out += [median_cpu(times[budget, timed])] * count
    return out


def loss_at_time(curves: list[dict[str, Any]], seconds: list[float], at: float) -> float:
    """The mean over ``curves`` (runs with ``evals``) of the test loss at ``at`` CPU seconds
    on the clock ``seconds`` (one per step).

    Example:
        >>> run = {"evals": [{"step": 0, "test": 4.0}, {"step": 2, "test": 3.0}]}
        >>> loss_at_time([run], [2.0, 2.0], 2.0)
        3.5
    """
    return statistics.fmean(at_time({"cpu_seconds": seconds, "evals": c["evals"]}, at)
                            for c in curves)


def curves_by_method(curve_rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The budget study's final runs at each method's chosen rate, by method."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in final_runs(curve_rows):
        out.setdefault(r["method"], []).append(r)
    return out


def default_seconds(times: Times, curves: dict[str, list[dict[str, Any]]]) -> float:
    """The fixed CPU time: the shortest whole run (its curve's steps) of any method timed
    at any budget (NaN when none)."""
    totals = []
    for budget, name in times:
        runs = curves.get(CURVE_OF[name], [])
        c = clock(name, budget, times, runs[0]["steps"]) if runs else None
        if c is not None:
            totals.append(sum(c))
    return min(totals) if totals else math.nan


def recompute_costs(times: Times) -> tuple[float, float] | None:
    """(LoRA's step, LoRA + GC's step) in CPU s at the loosest budget where both ran."""
    both = sorted(b for b, m in times if m == "lora" and (b, BASELINE) in times)
    if not both:
        return None
    return median_cpu(times[both[-1], "lora"]), median_cpu(times[both[-1], BASELINE])


def unfit_of(rows: list[dict[str, Any]]) -> set[tuple[int, str]]:
    """(budget, method) of every fit row that does not fit (the last row of a pair wins)."""
    last = {(r["budget_bytes"], r["method"]): r["fits"] for r in rows
            if r.get("phase") == "fit"}
    return {key for key, fits in last.items() if not fits}


def _cell(row: dict[str, Any] | None, base: dict[str, Any] | None, unfit: bool) -> str:
    if row is None:
        return "does not fit" if unfit else "-"
    t = median_cpu(row)
    ratio = f" ({t / median_cpu(base):.2f}x)" if base is not None else ""
    blocks = statistics.fmean(row["checkpointed_blocks"])
    k = f", k={row['k']}" if row.get("k") else ""
    return f"{t:.2f}{ratio}, {blocks:.1f}{k}"


def time_table(times: Times, peaks: dict[str, Any] | None,
               unfit: Collection[tuple[int, str]] = ()) -> str:
    """Per budget: each method's median CPU s/step, its ratio to ``lora+gc``, the blocks
    it checkpointed per step (mean; ``lora+every-k``: its k), or whether it does not fit
    (``unfit``: (budget, method)); the blocks the budget forces, ``lora+budget``'s ideal
    time and its excess over it."""
    budgets = sorted({b for b, _ in times})
    methods = [m for m in NAMES if any((b, m) in times or (b, m) in unfit for b in budgets)]
    costs = recompute_costs(times)
    table = []
    for b in budgets:
        base = times.get((b, BASELINE))
        layers = times[next(iter(times))]["layers"]
        forced = forced_blocks(b, gc_peak=peaks["lora+gc_peak_bytes"],
                               plain_peak=peaks["lora_peak_bytes"], layers=layers) \
            if peaks else None
        ideal = ideal_time(*costs, forced=forced, layers=layers) \
            if costs and forced is not None else None
        lb = times.get((b, "lora+budget"))
        table.append([f"{b / MIB:.1f}", "" if forced is None else str(forced),
                      *(_cell(times.get((b, m)), base, (b, m) in unfit) for m in methods),
                      "" if ideal is None else f"{ideal:.2f}",
                      "" if ideal is None or lb is None
                      else f"{excess(median_cpu(lb), ideal):+.1f}%"])
    return markdown_table(["budget MiB", "blocks forced", *methods,
                           "lora+budget ideal s", "lora+budget over ideal"], table)


def loss_table(times: Times, curves: dict[str, list[dict[str, Any]]], at: float) -> str:
    """Per budget: each method's mean test loss at ``at`` CPU seconds ("-": not timed
    there; "n/a": no curve)."""
    budgets = sorted({b for b, _ in times})
    methods = [m for m in NAMES if any((b, m) in times for b in budgets)]
    table = []
    for b in budgets:
        cells = []
        for m in methods:
            runs = curves.get(CURVE_OF[m], [])
            c = clock(m, b, times, runs[0]["steps"]) if runs and (b, m) in times else None
            cells.append("-" if (b, m) not in times else "n/a" if c is None
                         else f"{loss_at_time(runs, c, at):.4f}")
        table.append([f"{b / MIB:.1f}", *cells])
    return markdown_table(["budget MiB", *methods], table)


def prediction_table(times: Times, device: Any) -> tuple[str, float]:
    """Per budget: each method's measured ratio to ``lora+gc`` and the planner's predicted
    one on ``device`` (:mod:`.predict`), with the error in percent; and the largest error."""
    from .predict import error_percent, predicted_ratios

    predicted = predicted_ratios(times, device)
    budgets = sorted({b for b, _ in times})
    methods = [m for m in NAMES if m != BASELINE and any((b, m) in times for b in budgets)]
    table, worst = [], 0.0
    for b in budgets:
        cells = []
        for m in methods:
            if (b, m) not in times or (b, BASELINE) not in times:
                cells.append("-")
                continue
            measured = median_cpu(times[b, m]) / median_cpu(times[b, BASELINE])
            error = error_percent(predicted[b, m], measured)
            worst = max(worst, abs(error))
            cells.append(f"{measured:.3f} / {predicted[b, m]:.3f} ({error:+.1f}%)")
        table.append([f"{b / MIB:.1f}", *cells])
    return markdown_table(["budget MiB", *methods], table), worst


def report(rows: list[dict[str, Any]], curve_rows: list[dict[str, Any]],
           at: float | None = None) -> str:
    """The Markdown report of the frontier rows, the loss at ``at`` CPU seconds (default
    :func:`default_seconds`) from ``curve_rows`` (the budget study's rows)."""
    peaks = next((r for r in reversed(rows) if r.get("phase") == "peaks"), None)
    times = times_of(rows)
    curves = curves_by_method(curve_rows)
    at = default_seconds(times, curves) if at is None else at
    out = []
    if peaks:
        out.append(f"Peaks (accounted): LoRA + GC {peaks['lora+gc_peak_bytes'] / MIB:.1f} "
                   f"MiB, LoRA without checkpointing {peaks['lora_peak_bytes'] / MIB:.1f} "
                   f"MiB, APOLLO-Mini + GC {peaks['apollo-mini+gc_peak_bytes'] / MIB:.1f} MiB; "
                   f"{peaks['batch_size']} x {peaks['seq_len']} tokens, {peaks['device']}.\n")
    out += ["Median CPU s/step (ratio to lora+gc at the budget), blocks checkpointed per "
            "step (mean); '-': not run:\n", time_table(times, peaks, unfit_of(rows)) + "\n",
            f"Test loss at {at:.0f} CPU s (the budget study's curves on each budget's step "
            "times, mean over the seeds):\n", loss_table(times, curves, at)]
    from .predict import device_of_rows

    device = device_of_rows(rows)
    if device is not None:
        table, worst = prediction_table(times, device)
        out += [f"\nStep time as a ratio to lora+gc, measured / predicted by the planner "
                f"(MemoryPlanner.step_time on {device.name}: "
                f"{device.flops_per_second / 1e9:.1f} GFLOP/s, "
                f"{device.bytes_per_second / 1e9:.1f} GB/s measured), error; "
                f"largest {worst:.1f}%:\n", table]
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], curve_rows: list[dict[str, Any]], path: Path,
         at: float | None = None) -> None:
    """Step time (ratio to ``lora+gc``) and test loss at the fixed CPU time against the
    budget, one line per method, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = times_of(rows)
    curves = curves_by_method(curve_rows)
    at = default_seconds(times, curves) if at is None else at
    budgets = sorted({b for b, _ in times})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for m in NAMES:
        xs, ratio, loss = [], [], []
        for b in budgets:
            if (b, m) not in times:
                continue
            xs.append(b / MIB)
            base = times.get((b, BASELINE))
            ratio.append(math.nan if base is None
                         else median_cpu(times[b, m]) / median_cpu(base))
            runs = curves.get(CURVE_OF[m], [])
            c = clock(m, b, times, runs[0]["steps"]) if runs else None
            loss.append(math.nan if c is None else loss_at_time(runs, c, at))
        if xs:
            axes[0].plot(xs, ratio, marker="o", label=m)
            axes[1].plot(xs, loss, marker="o", label=m)
    axes[0].set_ylabel("CPU s/step, ratio to lora+gc")
    axes[1].set_ylabel(f"test loss at {at:.0f} CPU s")
    for ax in axes:
        ax.set_xlabel("memory budget (MiB)")
    axes[1].legend(fontsize=8)
    fig.suptitle("The memory-time frontier (SmolLM2-135M, 4 x 128 tokens, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
