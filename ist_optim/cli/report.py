"""Markdown tables and output files of ``ist-finetune``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import MethodRun

__all__ = ["compare_table", "markdown_table", "mean_range", "results_table", "save_outputs"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, "x"]]))
        | a | b |
        | --- | --- |
        | 1 | x |
    """
    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_range(values: Sequence[float], digits: int = 4) -> str:
    """``mean (min-max)`` of the values that are not NaN (just the mean for one, ``n/a``
    for none): a table cell for a measure over seeds.

    Example:
        >>> mean_range([1.0, 2.0, 3.0], 1), mean_range([2.5]), mean_range([math.nan])
        ('2.0 (1.0-3.0)', '2.5000', 'n/a')
    """
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return "n/a"
    mean = sum(kept) / len(kept)
    if len(kept) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(kept):.{digits}f}-{max(kept):.{digits}f})"


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f}"


def _ppl(loss: float) -> str:
    return f"{math.exp(loss):.2f}" if loss < 50 else "inf"


def results_table(run: MethodRun, settings: dict[str, Any]) -> str:
    """The single run's table: held-out loss/perplexity before and after, costs, settings."""
    r = run.result
    before, after = run.val_before, r.final_val_loss
    rows = [
        ["held-out loss", f"{before:.4f}", f"{after:.4f}"],
        ["held-out perplexity", _ppl(before), _ppl(after)],
    ]
    table = markdown_table(["metric", "before", "after"], rows)
    steps = len(r.step_seconds)
    costs = markdown_table(["cost", "value"], [
        ["steps", steps],
        ["training time (s)", f"{r.train_seconds:.1f}"],
        ["training CPU time (s)", f"{r.train_cpu_seconds:.1f}"],
        ["s/step", f"{r.train_seconds / max(1, steps):.2f}"],
        ["optimizer state (MiB)", _mb(r.state_bytes)],
        [f"{run.memory_kind} (MiB)", _mb(run.peak_bytes)],
    ])
    setting_rows = [[k, f"`{v}`"] for k, v in settings.items()]
    return (f"# ist-finetune results\n\n{table}\n\n{costs}\n\n"
            f"{markdown_table(['setting', 'value'], setting_rows)}\n")


def compare_table(runs: Sequence[MethodRun]) -> str:
    """One row per method: held-out loss, step time, optimizer state, peak memory."""
    kind = runs[0].memory_kind if runs else "peak memory"
    rows = []
    for run in runs:
        r = run.result
        steps = max(1, len(r.step_seconds))
        rows.append([run.spec.name, f"{run.val_before:.4f}", f"{r.final_val_loss:.4f}",
                     _ppl(r.final_val_loss), f"{r.train_seconds / steps:.2f}",
                     f"{r.train_cpu_seconds / steps:.2f}", _mb(r.state_bytes),
                     _mb(run.peak_bytes)])
    return markdown_table(["method", "held-out loss before", "held-out loss after",
                           "perplexity after", "s/step", "CPU s/step", "optimizer state MiB",
                           f"{kind} MiB"], rows)


def save_outputs(run: MethodRun, output_dir: Path, table: str) -> list[Path]:
    """Save the adapter (or model), the importance heatmap (IST runs; ``layers-trained.png``
    where the run measured no importance, e.g. uniform draws) and the table."""
    from ..reporting.plotting import plot_importance

    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    target = output_dir / ("model" if run.spec.peft == "full" else "adapter")
    run.model.save_pretrained(target)
    written.append(target)
    history = run.result.history
    if history is not None and history.steps:
        measured = bool(history.importance_matrix().abs().max() > 0)
        png = output_dir / ("importance.png" if measured else "layers-trained.png")
        fig = plot_importance(history, png, title=f"IST layer importance ({run.spec.name})"
                              if measured else f"IST ({run.spec.name})")
        import matplotlib.pyplot as plt

        plt.close(fig)
        written.append(png)
        hist_json = output_dir / "importance.json"
        hist_json.write_text(json.dumps(history.to_dict()))
        written.append(hist_json)
    results = output_dir / "results.md"
    results.write_text(table)
    written.append(results)
    summary = output_dir / "results.json"
    summary.write_text(json.dumps(run.summary(), indent=1))
    written.append(summary)
    return written
