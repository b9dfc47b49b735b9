"""The budgets of the frontier and what each one forces: pure functions of the measured
peaks.

The budgets run from LoRA + GC's accounted peak plus the study's margin (the budget study's
950.4 MiB at 10%) to LoRA's accounted peak without checkpointing (where every block fits as
it is), evenly spaced. A budget forces ``n`` blocks to be recomputed: the fewest whose
saved activations bring LoRA's peak within it, each checkpointed block saving an equal
share of the difference between the two peaks (:func:`forced_blocks`).

Example:
    >>> spaced_budgets(100, 200, 3)
    [100, 150, 200]
    >>> forced_blocks(150, gc_peak=100, plain_peak=200, layers=3)
    1
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ist_optim.config import parse_bytes

MIB = 2**20


def spaced_budgets(low: int, high: int, count: int) -> list[int]:
    """``count`` budgets (bytes) evenly spaced from ``low`` to ``high``, both included.

    Raises:
        ValueError: ``count < 2`` or ``low > high``.

    Example:
        >>> [b // MIB for b in spaced_budgets(950 * MIB, 1418 * MIB, 5)]
        [950, 1067, 1184, 1301, 1418]
    """
    if count < 2:
        raise ValueError(f"Invalid count: {count}; the frontier needs at least 2 budgets")
    if low > high:
        raise ValueError(f"Invalid budgets: the lowest {low:,} bytes is above the highest "
                         f"{high:,}")
    return [low + (high - low) * i // (count - 1) for i in range(count)]


def parse_budgets(texts: Sequence[str]) -> list[int]:
    """``--budgets``: each a size with a unit (:func:`ist_optim.config.parse_bytes`),
    sorted, duplicates dropped.

    Example:
        >>> parse_budgets(["1GiB", "950MiB", "950 MiB"]) == [950 * MIB, 1024 * MIB]
        True
    """
    return sorted({parse_bytes(t, "--budgets") for t in texts})


def forced_blocks(budget: int, *, gc_peak: int, plain_peak: int, layers: int) -> int:
    """The fewest blocks a step with every layer trained must recompute to fit ``budget``:
    0 at or above ``plain_peak`` (no checkpointing), every block below ``gc_peak``
    (checkpointing everywhere, which may still not fit). Each checkpointed block but the top
    one (recomputed as soon as the backward starts, it saves nothing at the peak) saves
    ``(plain_peak - gc_peak) / (layers - 1)`` bytes.

    Example:
        >>> [forced_blocks(b, gc_peak=100, plain_peak=130, layers=4) for b in (130, 129, 120,
        ...                                                                    110, 100, 99)]
        [0, 1, 1, 2, 3, 4]
    """
    if budget >= plain_peak:
        return 0
    if budget < gc_peak:
        return layers
    saved = (plain_peak - gc_peak) / (layers - 1)
    return min(layers - 1, math.ceil((plain_peak - budget) / saved - 1e-9))
