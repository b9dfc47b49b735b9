r"""One protocol per report: the rows a ``--report`` reads must have been measured the same
way (schedule, steps, sequence length, budget, ...), or be grouped by what differs.

A study says which fields of a row make its protocol (``protocol_of(row)``: the fields
that row carries; a budget row has no schedule, a sweep no final length) and what names a
run (``run_of(row)``). :func:`check_one_protocol` refuses rows whose fields differ, and
two rows of one run, with one line that names the fields and the fix;
:func:`group_rows` splits the rows by the fields given to ``--group-by``.

Example:
    >>> protocol_of = lambda r: {k: r[k] for k in ("schedule", "steps") if k in r}
    >>> rows = [{"schedule": "constant", "steps": 200}, {"schedule": "linear", "steps": 200},
    ...         {"note": "shared"}]
    >>> try:
    ...     check_one_protocol(rows, protocol_of)
    ... except ProtocolMismatch as err:
    ...     print(*str(err).split("; "), sep="\n")
    the rows mix protocols: schedule constant / linear
    report them apart with --group-by schedule, or give the files of one protocol
    >>> sorted(group_rows(rows, protocol_of, ["schedule"]))
    [('constant',), ('linear',)]
    >>> group_rows(rows, protocol_of, ["schedule"])[("linear",)]
    [{'schedule': 'linear', 'steps': 200}, {'note': 'shared'}]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

__all__ = ["ProtocolMismatch", "add_group_by", "check_one_protocol", "group_rows",
           "group_title", "protocol_groups", "report_groups"]

Row = dict[str, Any]
#: The protocol fields a row carries: {field: value}.
ProtocolOf = Callable[[Row], dict[str, Hashable]]


class ProtocolMismatch(ValueError):
    """Rows of different protocols, or two rows of one run, given to one report."""


def _values(rows: Iterable[Row], protocol_of: ProtocolOf) -> dict[str, list[Hashable]]:
    """Per field, its distinct values over ``rows`` in the order first seen."""
    seen: dict[str, list[Hashable]] = {}
    for row in rows:
        for field, value in protocol_of(row).items():
            values = seen.setdefault(field, [])
            if value not in values:
                values.append(value)
    return seen


def check_one_protocol(rows: Sequence[Row], protocol_of: ProtocolOf,
                       run_of: Callable[[Row], Hashable | None] | None = None) -> None:
    """Refuse ``rows`` that mix protocols, or that hold one run twice.

    Args:
        rows: the rows of one report.
        protocol_of: the protocol fields of a row (those it carries).
        run_of: what names a run (e.g. ``(method, lr, seed)``; None: not a run); two rows
            with one name would overwrite each other in the report.

    Raises:
        ProtocolMismatch: naming each field that differs and its values, and the fix.
    """
    differ = {f: v for f, v in _values(rows, protocol_of).items() if len(v) > 1}
    if differ:
        named = ", ".join(f"{f} {' / '.join(map(str, v))}" for f, v in differ.items())
        raise ProtocolMismatch(
            f"the rows mix protocols: {named}; report them apart with --group-by "
            f"{' '.join(differ)}, or give the files of one protocol")
    if run_of is None:
        return
    seen: set[Hashable] = set()
    for row in rows:
        run = run_of(row)
        if run is not None and run in seen:
            raise ProtocolMismatch(
                f"the run {run} is in the rows twice (the same run in two files?); a report "
                "reads each run once: give each file once, or the files of one study")
        seen.add(run)


def group_rows(rows: Sequence[Row], protocol_of: ProtocolOf, fields: Sequence[str]
               ) -> dict[tuple[Hashable, ...], list[Row]]:
    """The rows split by the values of ``fields``: one group per combination that a row
    carrying all of them has, in the order first seen; a row carrying only some of them
    joins every group that agrees on those (a budget row, which has no schedule, joins
    every schedule's group of its shape), a row carrying none joins every group.

    Raises:
        ProtocolMismatch: no row carries every field (a field no row has: a typo).
    """
    carried = [protocol_of(row) for row in rows]
    keys = list(dict.fromkeys(tuple(p[f] for f in fields) for p in carried
                              if all(f in p for f in fields)))
    if not keys:
        known = sorted(_values(rows, protocol_of))
        raise ProtocolMismatch(f"--group-by {' '.join(fields)}: no row carries all of them; "
                               f"the rows' protocol fields are {', '.join(known)}")
    return {key: [row for row, p in zip(rows, carried, strict=True)
                  if all(p[f] == v for f, v in zip(fields, key, strict=True) if f in p)]
            for key in keys}


def group_title(fields: Sequence[str], key: Sequence[Hashable]) -> str:
    """The heading of a group's report.

    Example:
        >>> group_title(["schedule", "steps"], ("linear", 400))
        '## schedule linear, steps 400'
    """
    return "## " + ", ".join(f"{f} {v}" for f, v in zip(fields, key, strict=True))


def protocol_groups(rows: Sequence[Row], protocol_of: ProtocolOf,
                    group_by: Sequence[str] | None = None,
                    run_of: Callable[[Row], Hashable | None] | None = None
                    ) -> list[tuple[str | None, list[Row]]]:
    """The rows of a ``--report``, each group checked (:func:`check_one_protocol`):
    ``[(None, rows)]`` without ``group_by``, else ``(heading, rows)`` per group
    (:func:`group_rows`, :func:`group_title`).

    Raises:
        ProtocolMismatch: rows of several protocols in one group, or one run twice.
    """
    if not group_by:
        groups: list[tuple[str | None, list[Row]]] = [(None, list(rows))]
    else:
        groups = [(group_title(group_by, key), group)
                  for key, group in group_rows(rows, protocol_of, group_by).items()]
    for _title, group in groups:
        check_one_protocol(group, protocol_of, run_of)
    return groups


def report_groups(groups: Sequence[tuple[str | None, list[Row]]],
                  report: Callable[[list[Row]], str]) -> str:
    """The reports of :func:`protocol_groups`' groups, each under its heading.

    Example:
        >>> print(report_groups([("## steps 200", [1, 2]), ("## steps 400", [3])],
        ...                     lambda rows: f"{len(rows)} rows"))
        ## steps 200
        <BLANKLINE>
        2 rows
        <BLANKLINE>
        ## steps 400
        <BLANKLINE>
        1 rows
    """
    return "\n\n".join(report(rows) if title is None else f"{title}\n\n{report(rows)}"
                       for title, rows in groups)


def add_group_by(parser: argparse.ArgumentParser) -> None:
    """The ``--group-by FIELD ...`` option of a study's ``--report``."""
    parser.add_argument("--group-by", nargs="+", default=None, metavar="FIELD",
                        help="with --report: one report per value of these protocol fields "
                        "(rows of different protocols are refused otherwise)")
