"""Each method's learning rate chosen on a validation split, and the runs left to do: the
logic the budget and few-data benchmarks share.

A study sweeps each method's grid of rates on one seed, chooses per method the rate with
the lowest validation loss, then runs that rate on every seed. These are pure functions of
the runs already made (so a cut study resumes where it stopped); each study says how its
rows hold a sweep's validation loss and which of its rows count as done.

Example:
    >>> points = [("m", 1.0, 4.0), ("m", 2.0, 3.0), ("m", 4.0, 3.5)]
    >>> next_runs(["m"], {"m": (1.0, 2.0, 4.0)}, [0, 1], points, set())
    [('final', 'm', 2.0, 0), ('final', 'm', 2.0, 1)]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["Planned", "at_chosen_rates", "chosen_rates", "next_runs"]

#: A run to do: (phase, method, learning rate, seed), phase ``"sweep"`` or ``"final"``.
Planned = tuple[str, str, float, int]


def chosen_rates(points: Iterable[tuple[str, float, float]]) -> dict[str, float]:
    """Per method, the swept rate with the lowest validation loss (the first swept on a
    tie), from ``(method, rate, validation loss)`` points.

    Example:
        >>> chosen_rates([("m", 1e-3, 4.0), ("m", 2e-3, 3.5), ("n", 1e-3, 2.0)])
        {'m': 0.002, 'n': 0.001}
    """
    best: dict[str, tuple[float, float]] = {}
    for method, rate, val in points:
        if method not in best or val < best[method][0]:
            best[method] = (val, rate)
    return {method: rate for method, (_val, rate) in best.items()}


def _extension(grid: Sequence[float], swept: list[float], chosen: float,
               max_extensions: int) -> float | None:
    """The rate past the edge of ``swept`` that ``chosen`` sits on (twice the highest, half
    the lowest), or None: chosen inside, or ``max_extensions`` rates added already."""
    if len(grid) == 1 or len(swept) >= len(grid) + max_extensions:
        return None
    return {swept[-1]: swept[-1] * 2, swept[0]: swept[0] / 2}.get(chosen)


def next_runs(methods: Sequence[str], grids: Mapping[str, Sequence[float]],
              seeds: Sequence[int], points: Iterable[tuple[str, float, float]],
              finished: set[tuple[str, float, int]], *, sweep_seed: int = 0,
              max_extensions: int = 0, same_rate: Mapping[str, str] | None = None
              ) -> list[Planned]:
    """The runs left, in order: every method's sweep on ``sweep_seed`` first, then each
    method's chosen rate on every seed.

    Args:
        methods: the methods to run, in order.
        grids: the rates of each method; a method with one rate is not swept, it runs that
            rate.
        seeds: the seeds of the final runs.
        points: ``(method, rate, validation loss)`` of every sweep run made.
        finished: ``(method, rate, seed)`` of the runs that count as final runs done (a
            study whose sweep runs are its sweep seed's finals includes them).
        sweep_seed: the seed the sweeps run on.
        max_extensions: a sweep whose best rate is the highest (lowest) swept is extended
            by the rate twice as high (half), up to this many rates beyond the grid, so that
            the chosen rate is not an edge of the grid; 0: the grid as given.
        same_rate: ``{method: other}``: no sweep for ``method``, it runs at the rate
            chosen for ``other``.

    Example:
        >>> next_runs(["a"], {"a": (1.0, 2.0)}, [0, 1], [], set())
        [('sweep', 'a', 1.0, 0), ('sweep', 'a', 2.0, 0)]
        >>> next_runs(["a"], {"a": (1.0,)}, [0, 1], [], set())
        [('final', 'a', 1.0, 0), ('final', 'a', 1.0, 1)]
        >>> done = [("a", 1.0, 4.0), ("a", 2.0, 3.0)]  # 2.0 is best and the edge
        >>> next_runs(["a"], {"a": (1.0, 2.0)}, [0], done, set(), max_extensions=2)
        [('sweep', 'a', 4.0, 0)]
    """
    same_rate = dict(same_rate or {})
    points = list(points)
    swept: dict[str, list[float]] = {}
    for method, rate, _val in points:
        swept.setdefault(method, []).append(rate)
    sweep = [("sweep", m, rate, sweep_seed) for m in methods
             if m not in same_rate and len(grids[m]) > 1
             for rate in grids[m] if rate not in swept.get(m, [])]
    if sweep:
        return sweep
    chosen = {**chosen_rates(points), **{m: g[0] for m, g in grids.items() if len(g) == 1}}
    for m in methods:
        if m in same_rate or max_extensions == 0 or len(grids[m]) == 1:
            continue
        edge = _extension(grids[m], sorted(set(swept[m])), chosen[m], max_extensions)
        if edge is not None:
            sweep.append(("sweep", m, edge, sweep_seed))
    if sweep:
        return sweep
    chosen.update({m: chosen[other] for m, other in same_rate.items()})
    return [("final", m, chosen[m], s) for m in methods for s in seeds
            if (m, chosen[m], s) not in finished]


def at_chosen_rates(rows: Iterable[dict[str, Any]], chosen: Mapping[str, float]
                    ) -> list[dict[str, Any]]:
    """The rows run at their method's chosen rate (a method with no choice keeps all its
    rows): a rate swept later (an edge extension) supersedes the runs of the earlier choice.

    Example:
        >>> rows = [{"method": "m", "lr": 1.0}, {"method": "m", "lr": 2.0},
        ...         {"method": "n", "lr": 5.0}]
        >>> at_chosen_rates(rows, {"m": 2.0})
        [{'method': 'm', 'lr': 2.0}, {'method': 'n', 'lr': 5.0}]
    """
    return [r for r in rows if chosen.get(r["method"], r["lr"]) == r["lr"]]
