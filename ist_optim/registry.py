"""Registries of the extension points: sampling rules and importance estimators by name.

A sampling rule (how the layers of a step are drawn) or an estimator (how an importance
round measures and updates the scores) is one class in one file that registers itself::

    @register_sampling_rule
    class MyRule(SamplingRule):        # ist_optim.sampling.rules.SamplingRule
        name = "my-rule"
        ...

``ISTConfig(sampling="my-rule")`` then validates, and ``ISTOptimizer`` builds it; nothing
else changes (see docs/extending.md). This module imports nothing from the package, so
:mod:`ist_optim.config` can validate names against it and stay a leaf.

Example (the built-in names; rules and estimators registered later follow them):
    >>> import ist_optim
    >>> sampling_rule_names()[:3]
    ('importance', 'uniform', 'depth-aware')
    >>> estimator_names()[:3]
    ('paper', 'normalized', 'first-order')
"""

from __future__ import annotations

from typing import Any, TypeVar

__all__ = [
    "estimator",
    "estimator_names",
    "register_estimator",
    "register_sampling_rule",
    "sampling_rule",
    "sampling_rule_names",
]

T = TypeVar("T")

_SAMPLING_RULES: dict[str, Any] = {}
_ESTIMATORS: dict[str, Any] = {}


def _register(table: dict[str, Any], kind: str, cls: T) -> T:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} {cls!r} has no name; set the class attribute name = '...'")
    if name in table and table[name] is not cls:
        raise ValueError(f"{kind} {name!r} is already registered ({table[name]!r}); "
                         "choose another name")
    table[name] = cls
    return cls


def register_sampling_rule(cls: T) -> T:
    """Class decorator: make a :class:`ist_optim.sampling.rules.SamplingRule` subclass
    available as ``sampling=cls.name``.

    Raises:
        ValueError: when the class has no ``name`` or another class has the name.
    """
    return _register(_SAMPLING_RULES, "sampling rule", cls)


def register_estimator(cls: T) -> T:
    """Class decorator: make an :class:`ist_optim.importance.rounds.ImportanceRound` subclass
    available as ``estimator=cls.name``.

    Raises:
        ValueError: when the class has no ``name`` or another class has the name.
    """
    return _register(_ESTIMATORS, "estimator", cls)


def _lookup(table: dict[str, Any], option: str, name: Any) -> Any:
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"Invalid {option}: {name!r}; expected one of {tuple(table)}")
    return table[name]


def sampling_rule(name: str) -> Any:
    """The sampling-rule class registered as ``name``.

    Raises:
        ValueError: naming the registered rules, for an unknown name.
    """
    return _lookup(_SAMPLING_RULES, "sampling", name)


def estimator(name: str) -> Any:
    """The round class registered as estimator ``name``.

    Raises:
        ValueError: naming the registered estimators, for an unknown name.
    """
    return _lookup(_ESTIMATORS, "estimator", name)


def sampling_rule_names() -> tuple[str, ...]:
    """Names of the registered sampling rules, in registration order."""
    return tuple(_SAMPLING_RULES)


def estimator_names() -> tuple[str, ...]:
    """Names of the registered estimators, in registration order."""
    return tuple(_ESTIMATORS)
