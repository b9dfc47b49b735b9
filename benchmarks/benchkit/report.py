"""Results of the benchmarks: JSONL rows (one per run, appended as each run ends, so a cut
run resumes from its file) and the Markdown helpers of their reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ist_optim.cli import markdown_table, mean_range

__all__ = ["append_row", "markdown_table", "mean_range", "read_rows", "spearman"]


def read_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """Every JSON line of ``paths``, in order; a missing file holds no rows (a first run)."""
    return [json.loads(line) for p in paths if p.exists()
            for line in p.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to ``path`` as one JSON line."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties).

    Example:
        >>> round(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])), 6)
        0.5
    """
    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(x.numel(), dtype=torch.float64)
        for value in x.unique():
            mask = x == value
            r[mask] = r[mask].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
