"""How an IST option is declared: one field, from which every interface is built.

Each field of :class:`ist_optim.ISTConfig` is declared with :func:`option`: its default,
its one-paragraph help, the check of its value, whether ``ist-finetune`` has a flag for it
(``--<name>``), whether the axolotl plugin reads a YAML key for it (``ist_<name>``), and
where its choices come from (a registry, read when asked). :func:`options` returns these
declarations; the CLI's IST flags (:mod:`ist_optim.cli.parser`), the axolotl schema
(:mod:`ist_optim.integrations.axolotl`), the README's options table
(:func:`options_table`) and ``ISTConfig``'s own validation are built from them, so an
option is written once (docs/extending.md, "A new option").

This module is a leaf: it imports nothing of the package.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from functools import cache
from typing import Any, Literal

__all__ = [
    "Check",
    "Choices",
    "Option",
    "at_least",
    "check_count",
    "check_int",
    "check_number",
    "flag_value",
    "is_bool",
    "is_callable",
    "markdown_table",
    "number_in",
    "one_of",
    "option",
    "options",
    "optional",
    "parse_count_or_fraction",
    "plain",
]

Check = Callable[[str, Any], object]
"""A check of one option's value: ``check(name, value)`` raises a one-line ``TypeError`` /
``ValueError`` naming both, or returns."""

_METADATA_KEY = "ist_option"
_TEXT_STYLE = Literal["markdown", "plain"]


# ---------------------------------------------------------------------- value checks
def check_number(name: str, value: Any, low: float, high: float, *, closed_high: bool) -> float:
    """``value`` as a float in ``[low, high]`` (or ``[low, high)``), else a named error.

    Raises:
        TypeError: for a bool or a non-number.
        ValueError: for NaN or a value outside the range, naming both.

    Example:
        >>> check_number("suppression", 0.25, 0.0, 1.0, closed_high=False)
        0.25
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    bracket = "]" if closed_high else ")"
    ok = low <= value <= high if closed_high else low <= value < high
    if math.isnan(value) or not ok:
        raise ValueError(f"Invalid {name}: {value}; expected a number in [{low}, {high}{bracket}")
    return float(value)


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int ``>= low``, else a named error.

    Example:
        >>> check_int("update_interval", 10, 1)
        10
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"Invalid {name}: {value}; expected an int >= {low}")
    return value


def check_count(name: str, value: Any, num_layers: int | None = None) -> None:
    """An int count in ``[1, num_layers]`` (``>= 1`` while the layer count is unknown) or a
    float fraction in ``(0, 1]``; the one check behind ``active_layers``,
    ``suppressed_layers`` and :func:`ist_optim.resolve_count`.

    Example:
        >>> check_count("active_layers", 0.25), check_count("active_layers", 3, 32)
        (None, None)
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be an int count or a float fraction, got {value!r}")
    if isinstance(value, int):
        if num_layers is None and value < 1:
            raise ValueError(f"{name}={value} is below 1; pass a layer count >= 1 or a "
                             "fraction in (0, 1]")
        if num_layers is not None and not 1 <= value <= num_layers:
            raise ValueError(
                f"{name}={value} is outside [1, {num_layers}] for a model with {num_layers} "
                "layers; pass a count in that range or a fraction in (0, 1]")
    elif math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"{name}={value} is not a fraction in (0, 1]; pass e.g. 0.25, or an int count"
        )


def at_least(low: int) -> Check:
    """The check of an int option ``>= low``.

    Example:
        >>> at_least(1)("update_interval", 0)
        Traceback (most recent call last):
        ...
        ValueError: Invalid update_interval: 0; expected an int >= 1
    """
    return lambda name, value: check_int(name, value, low)


def number_in(low: float, high: float, *, closed_high: bool) -> Check:
    """The check of a number option in ``[low, high]`` or ``[low, high)``.

    Example:
        >>> number_in(0.0, 1.0, closed_high=False)("suppression", 0.5)
        0.5
    """
    return lambda name, value: check_number(name, value, low, high, closed_high=closed_high)


def is_bool(name: str, value: Any) -> None:
    """The check of a bool option.

    Example:
        >>> is_bool("freeze_inactive", 1)
        Traceback (most recent call last):
        ...
        TypeError: freeze_inactive must be a bool, got 1
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def is_callable(name: str, value: Any) -> None:
    """The check of an option that holds a function.

    Example:
        >>> is_callable("active_schedule", len)
    """
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {value!r}")


def optional(check: Check) -> Check:
    """``check``, but ``None`` passes (an option whose ``None`` means "the default").

    Example:
        >>> optional(at_least(1))("depth_window", None)
    """
    def checked(name: str, value: Any) -> object:
        return None if value is None else check(name, value)
    return checked


@dataclass(frozen=True)
class Choices:
    """The names an option accepts, read when asked: a registry's names at run time.

    Attributes:
        names: returns the accepted names, in order.
        kind: what one is, for text written before anything is registered
            (``"sampling rule"``).
        origin: the module that defines a name (its class's ``__module__``), for tables
            that list only the package's own names; ``None``: every name is the package's.

    Example:
        >>> Choices(lambda: ("keep", "drop"), "policy")()
        ('keep', 'drop')
    """

    names: Callable[[], tuple[str, ...]]
    kind: str
    origin: Callable[[str], str] | None = None

    def __call__(self, *, builtin_only: bool = False) -> tuple[str, ...]:
        names = tuple(self.names())
        if builtin_only and self.origin is not None:
            names = tuple(n for n in names if self.origin(n).startswith("ist_optim."))
        return names


def one_of(choices: Choices) -> Check:
    """The check of an option whose value is one of ``choices()`` (read at check time).

    Example:
        >>> one_of(Choices(lambda: ("keep", "drop"), "policy"))("state_policy", "gpu")
        Traceback (most recent call last):
        ...
        ValueError: Invalid state_policy: 'gpu'; expected one of ('keep', 'drop')
    """
    def checked(name: str, value: Any) -> None:
        names = choices()
        if not isinstance(value, str) or value not in names:
            raise ValueError(f"Invalid {name}: {value!r}; expected one of {names}")
    return checked


# ---------------------------------------------------------------------- the declaration
@dataclass(frozen=True)
class Option:
    """One IST option as declared on its field (see :func:`option`).

    Attributes:
        name: the field name, the ``ISTOptimizer`` keyword.
        default: its default.
        annotation: its type (resolved).
        help: one paragraph in markdown (backticks, ``docs/<page>.md#anchor`` references);
            ``{choices}`` stands for the accepted names.
        check: the check of a value (:data:`Check`).
        cli: whether ``ist-finetune`` has the flag :attr:`cli_flag`; the others are set
            with ``--ist-kwarg NAME=VALUE``.
        yaml: whether the axolotl plugin reads the key :attr:`yaml_key`.
        choices: where the accepted names come from, or None.
        default_text: the default as the docs write it (markdown), or None for
            ``repr(default)``.
    """

    name: str
    default: Any
    annotation: Any
    help: str
    check: Check
    cli: bool = False
    yaml: bool = True
    choices: Choices | None = None
    default_text: str | None = None

    @property
    def cli_flag(self) -> str | None:
        """``--active-layers`` for ``active_layers``; None when the CLI has no flag."""
        return "--" + self.name.replace("_", "-") if self.cli else None

    @property
    def yaml_key(self) -> str | None:
        """``ist_active_layers`` for ``active_layers``; None when it is not a YAML key."""
        return f"ist_{self.name}" if self.yaml else None

    def default_doc(self) -> str:
        """The default in markdown: ``default_text`` or the value in backticks."""
        if self.default_text is not None:
            return self.default_text
        value = f'"{self.default}"' if isinstance(self.default, str) else repr(self.default)
        return f"`{value}`"

    def describe(self, *, style: _TEXT_STYLE = "markdown", builtin_only: bool = False,
                 link_prefix: str | None = None) -> str:
        """The help with ``{choices}`` filled in.

        Args:
            style: ``"markdown"`` keeps backticks; ``"plain"`` drops them (``--help``,
                YAML schema descriptions).
            builtin_only: list only the package's own names (tables in files, which must
                not change with what a process registered).
            link_prefix: render ``docs/<page>.md#anchor`` as a markdown link to
                ``<link_prefix><page>.md#anchor`` (``"docs/"`` from the README, ``""``
                from a page in docs/); None leaves it as text.

        Example:
            >>> from ist_optim import ISTConfig
            >>> sampling = {o.name: o for o in options(ISTConfig)}["sampling"]
            >>> sampling.describe(style="plain", builtin_only=True).split(": ")[1]
            'importance, uniform, depth-aware (docs/extending.md registers more). importance'
        """
        text = self.help
        if self.choices is not None:
            names = self.choices(builtin_only=builtin_only)
            listed = ", ".join(f"`{n}`" for n in names) or f"any registered {self.choices.kind}"
            text = text.replace("{choices}", listed)
        if link_prefix is not None:
            text = re.sub(r"docs/([\w-]+\.md)(#[\w-]+)?",
                          lambda m: f"[{'docs/' if link_prefix else ''}{m.group(1)}]"
                                    f"({link_prefix}{m.group(1)}{m.group(2) or ''})", text)
        return plain(text) if style == "plain" else text

    def from_text(self, text: str) -> Any:
        """The value of a command-line word, parsed by the option's type and checked.

        Raises:
            ValueError, TypeError: one line naming the text or value.

        Example:
            >>> from ist_optim import ISTConfig
            >>> active = {o.name: o for o in options(ISTConfig)}["active_layers"]
            >>> active.from_text("2"), active.from_text("0.5")
            (2, 0.5)
        """
        value = flag_value(self.annotation, text)
        self.check(self.name, value)
        return value


def plain(text: str) -> str:
    """``text`` without markdown backticks (for ``--help`` and schema descriptions).

    Example:
        >>> plain("layers trained per step `N_u`")
        'layers trained per step N_u'
    """
    return text.replace("`", "")


def option(default: Any, help: str, *, check: Check, cli: bool = False, yaml: bool = True,
           choices: Choices | None = None, default_text: str | None = None) -> Any:
    """Declare an ``ISTConfig`` field: ``name: type = option(default, "help", check=...)``.

    Args:
        default: the default value (the paper's).
        help: one paragraph of markdown; ``{choices}`` stands for the accepted names.
        check: the check of one value (:func:`at_least`, :func:`number_in`,
            :func:`one_of`, :func:`optional`, :func:`is_bool`, or any ``(name, value)``
            function raising a one-line error); cross-option rules go in
            ``ISTConfig.__post_init__``.
        cli: give ``ist-finetune`` the flag ``--<name>`` (default: reachable through
            ``--ist-kwarg``).
        yaml: read the axolotl YAML key ``ist_<name>`` (False only where YAML cannot say
            it: a callable, or what the plugin fills itself).
        choices: where the accepted names come from (also fills ``{choices}``).
        default_text: the default as the docs write it, where ``repr`` says too little.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Settings:
        ...     rounds: int = option(3, "rounds per step", check=at_least(1), cli=True)
        >>> [(o.name, o.cli_flag, o.yaml_key, o.default) for o in options(Settings)]
        [('rounds', '--rounds', 'ist_rounds', 3)]
    """
    if "\n" in help or "|" in help:
        raise ValueError(f"the help of an option is one line without '|' (a table cell), "
                         f"got {help!r}")
    return field(default=default, metadata={_METADATA_KEY: {
        "help": help, "check": check, "cli": cli, "yaml": yaml, "choices": choices,
        "default_text": default_text}})


@cache
def options(config_cls: type) -> tuple[Option, ...]:
    """The declared options of a dataclass (``ISTConfig`` or a subclass), in field order.

    Raises:
        TypeError: for a field declared without :func:`option`.

    Example:
        >>> from ist_optim import ISTConfig
        >>> [o.name for o in options(ISTConfig)][:3]
        ['active_layers', 'suppressed_layers', 'num_candidates']
    """
    if not is_dataclass(config_cls):
        raise TypeError(f"expected a dataclass such as ISTConfig, got {config_cls!r}")
    hints = typing.get_type_hints(config_cls)
    found = []
    for f in fields(config_cls):
        spec = f.metadata.get(_METADATA_KEY)
        if spec is None or f.default is MISSING:
            raise TypeError(
                f"{config_cls.__name__}.{f.name} is not declared with option(default, help, "
                "check=...); declare it so (docs/extending.md, 'A new option')")
        found.append(Option(f.name, f.default, hints[f.name], **spec))
    return tuple(found)


# ---------------------------------------------------------------------- text and tables
def parse_count_or_fraction(text: str) -> int | float:
    """``"2"`` -> 2 layers, ``"0.25"`` -> a quarter of the layers.

    Example:
        >>> parse_count_or_fraction("2"), parse_count_or_fraction("0.25")
        (2, 0.25)
    """
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"expected a layer count (2) or a fraction of the layers (0.25), got {text!r}"
        ) from None


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _parse_scalar(kind: type, text: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got "
                         f"{text!r}") from None


def flag_value(annotation: Any, text: str) -> Any:
    """A command-line word as a value of ``annotation`` (the option's type).

    ``int | float`` is a layer count or fraction; ``Literal`` and ``str`` stay text;
    ``Optional`` reads as its type.

    Raises:
        ValueError: naming the text and what was expected.

    Example:
        >>> flag_value(int, "3"), flag_value(int | float, "0.5"), flag_value(bool | None, "no")
        (3, 0.5, False)
    """
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if typing.get_origin(annotation) is Literal:
        kinds = [str]
    if set(kinds) == {int, float}:
        return parse_count_or_fraction(text)
    if len(kinds) == 1 and kinds[0] in (int, float):
        return _parse_scalar(kinds[0], text)
    if kinds == [bool]:
        return _parse_bool(text)
    if all(k is str or typing.get_origin(k) is Literal for k in kinds):
        return text
    raise ValueError(f"an option of type {annotation} cannot be given as text; pass it in "
                     "Python")


def markdown_table(config_cls: type, *, link_prefix: str | None = "docs/") -> str:
    """The markdown table of the options (README "Options"): option, default, meaning.

    Only the package's own registered names are listed, so the table does not change with
    what a process registered.

    Example:
        >>> from ist_optim import ISTConfig
        >>> print(markdown_table(ISTConfig).splitlines()[2])  # doctest: +ELLIPSIS
        | `active_layers` | `0.25` | layers trained per step `N_u`: an int count, or a ... |
    """
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{o.name}` | {o.default_doc()} | "
             f"{o.describe(builtin_only=True, link_prefix=link_prefix)} |"
             for o in options(config_cls)]
    return "\n".join(rows)

