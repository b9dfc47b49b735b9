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


def chosen_lrs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per method, the swept rate with the lowest final validation loss.

    Example:
        >>> rows = [{"phase": "sweep", "method": "m", "lr": lr, "evals": [{"val": v}]}
        ...         for lr, v in ((1e-3, 4.0), (2e-3, 3.5))]
        >>> chosen_lrs(rows)
        {'m': 0.002}
    """
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        if r.get("phase") == "sweep":
            val = r["evals"][-1]["val"]
            if r["method"] not in best or val < best[r["method"]][0]:
                best[r["method"]] = (val, r["lr"])
    return {m: lr for m, (_v, lr) in best.items()}


def todo(methods: list[str], grids: dict[str, tuple[float, ...]], seeds: list[int],
         rows: list[dict[str, Any]], *, extend: bool = True
         ) -> list[tuple[str, str, float, int]]:
    """The runs left, as (phase, method, lr, seed): first every method's sweep on seed 0
    (methods with one rate have none), then per method its chosen rate on every seed.

    With ``extend``, a sweep whose best rate is the highest (lowest) swept is extended by
    the rate twice as high (half as low), up to :data:`MAX_EXTENSIONS` rates, so that the
    chosen rate is not an edge of the grid.

    Example:
        >>> todo(["a"], {"a": (1.0, 2.0)}, [0, 1], [])
        [('sweep', 'a', 1.0, 0), ('sweep', 'a', 2.0, 0)]
        >>> todo(["a"], {"a": (1.0,)}, [0, 1], [])
        [('final', 'a', 1.0, 0), ('final', 'a', 1.0, 1)]
        >>> rows = [{"phase": "sweep", "method": "a", "lr": lr, "seed": 0,
        ...          "evals": [{"val": v}]} for lr, v in ((1.0, 4.0), (2.0, 3.0))]
        >>> todo(["a"], {"a": (1.0, 2.0)}, [0], rows)  # 2.0 is best and the edge
        [('sweep', 'a', 4.0, 0)]
    """
    have = {(r["phase"], r["method"], r["lr"], r["seed"]) for r in rows
            if r.get("phase") in ("sweep", "final")}
    sweep = [("sweep", m, lr, 0) for m in methods if len(grids[m]) > 1 for lr in grids[m]
             if ("sweep", m, lr, 0) not in have]
    if sweep:
        return sweep
    chosen = {**chosen_lrs(rows), **{m: g[0] for m, g in grids.items() if len(g) == 1}}
    for m in methods:
        swept = sorted(lr for phase, name, lr, _seed in have if phase == "sweep" and name == m)
        if not extend or len(grids[m]) == 1 or len(swept) >= len(grids[m]) + MAX_EXTENSIONS:
            continue
        edge = {swept[-1]: swept[-1] * 2, swept[0]: swept[0] / 2}.get(chosen[m])
        if edge is not None:
            sweep.append(("sweep", m, edge, 0))
    if sweep:
        return sweep
    return [("final", m, chosen[m], s) for m in methods for s in seeds
            if ("final", m, chosen[m], s) not in have]


def final_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The final runs at each method's chosen rate: a rate swept later (an edge extension,
    see :func:`todo`) supersedes the finals run at the previous choice."""
    chosen = chosen_lrs(rows)
    return [r for r in rows if r.get("phase") == "final"
            and chosen.get(r["method"], r["lr"]) == r["lr"]]


def claim_key(row: dict[str, Any]) -> tuple[str, str, float, int]:
    """The run a claim row holds, as :func:`todo` names runs: (phase, method, lr, seed)."""
    return row["run_phase"], row["method"], row["lr"], row["seed"]


def unclaimed(left: list[tuple[str, str, float, int]], rows: list[dict[str, Any]],
              alive: Callable[[dict[str, Any]], bool]) -> list[tuple[str, str, float, int]]:
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
