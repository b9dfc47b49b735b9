"""What the budget benchmark runs next, from the rows already written (so a cut run
resumes): every method's learning-rate sweep on seed 0, extended past an edge that is best,
then the chosen rate on every seed. Pure functions of the rows.

Example:
    >>> rows = [{"phase": "sweep", "method": "m", "lr": lr, "seed": 0, "evals": [{"val": v}]}
    ...         for lr, v in ((1.0, 4.0), (2.0, 3.0), (4.0, 3.5))]
    >>> todo(["m"], {"m": (1.0, 2.0, 4.0)}, [0, 1], rows)
    [('final', 'm', 2.0, 0), ('final', 'm', 2.0, 1)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..benchkit.sweep import Planned, at_chosen_rates, chosen_rates, next_runs

#: Rates a sweep may add beyond its grid when its best rate is at an edge (see :func:`todo`).
MAX_EXTENSIONS = 2


def runs_of_schedule(rows: list[dict[str, Any]], schedule: str) -> list[dict[str, Any]]:
    """The rows of runs at rate schedule ``schedule`` (rows written before schedules existed
    ran at a constant rate), with the budget and fit rows, which every schedule shares.

    Example:
        >>> rows = [{"phase": "budget"}, {"phase": "final"},
        ...         {"phase": "final", "schedule": "linear"}]
        >>> runs_of_schedule(rows, "linear")
        [{'phase': 'budget'}, {'phase': 'final', 'schedule': 'linear'}]
    """
    return [r for r in rows if r.get("phase") in ("budget", "fit")
            or r.get("schedule", "constant") == schedule]


def sweep_points(rows: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """``(method, rate, validation loss at the end)`` of every sweep row."""
    return [(r["method"], r["lr"], r["evals"][-1]["val"]) for r in rows
            if r.get("phase") == "sweep"]


def chosen_lrs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per method, the swept rate with the lowest final validation loss.

    Example:
        >>> rows = [{"phase": "sweep", "method": "m", "lr": lr, "evals": [{"val": v}]}
        ...         for lr, v in ((1e-3, 4.0), (2e-3, 3.5))]
        >>> chosen_lrs(rows)
        {'m': 0.002}
    """
    return chosen_rates(sweep_points(rows))


def todo(methods: list[str], grids: dict[str, tuple[float, ...]], seeds: list[int],
         rows: list[dict[str, Any]], *, extend: bool = True) -> list[Planned]:
    """The runs left, as (phase, method, lr, seed)
    (:func:`benchmarks.benchkit.sweep.next_runs`): first every method's sweep on seed 0
    (methods with one rate have none), then per method its chosen rate on every seed. With
    ``extend``, a sweep whose best rate is an edge of what was swept is extended past it, up
    to :data:`MAX_EXTENSIONS` rates.

    Example:
        >>> rows = [{"phase": "sweep", "method": "a", "lr": lr, "seed": 0,
        ...          "evals": [{"val": v}]} for lr, v in ((1.0, 4.0), (2.0, 3.0))]
        >>> todo(["a"], {"a": (1.0, 2.0)}, [0], rows)  # 2.0 is best and the edge
        [('sweep', 'a', 4.0, 0)]
    """
    finished = {(r["method"], r["lr"], r["seed"]) for r in rows if r.get("phase") == "final"}
    return next_runs(methods, grids, seeds, sweep_points(rows), finished,
                     max_extensions=MAX_EXTENSIONS if extend else 0)


def final_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The final runs at each method's chosen rate: a rate swept later (an edge extension,
    see :func:`todo`) supersedes the finals run at the previous choice."""
    return at_chosen_rates([r for r in rows if r.get("phase") == "final"], chosen_lrs(rows))


def claim_key(row: dict[str, Any]) -> Planned:
    """The run a claim row holds, as :func:`todo` names runs: (phase, method, lr, seed)."""
    return row["run_phase"], row["method"], row["lr"], row["seed"]


def unclaimed(left: list[Planned], rows: list[dict[str, Any]],
              alive: Callable[[dict[str, Any]], bool]) -> list[Planned]:
    """The runs of ``left`` that no live claim holds: the ones this process may take.

    A process sharing ``--out`` with others appends a ``{"phase": "claim"}`` row for the
    run it starts; a claim is live while ``alive(row)`` (its process still runs); the run's
    own row, once written, takes the run out of :func:`todo`.

    Example:
        >>> claim = {"phase": "claim", "run_phase": "final", "method": "a", "lr": 1.0,
        ...          "seed": 0, "pid": 7}
        >>> left = [("final", "a", 1.0, 0), ("final", "a", 1.0, 1)]
        >>> unclaimed(left, [claim], alive=lambda r: True)
        [('final', 'a', 1.0, 1)]
        >>> unclaimed(left, [claim], alive=lambda r: False) == left  # its process died
        True
    """
    held = {claim_key(r) for r in rows if r.get("phase") == "claim" and alive(r)}
    return [run for run in left if run not in held]
