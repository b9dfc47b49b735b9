"""The ``ist_*`` YAML keys of the axolotl plugin and of ``ist-llamafactory``, written from
``ISTConfig``'s declarations.

Every option declared with a YAML key (:func:`ist_optim.options.option`) is the key
``ist_<name>``; the keys of the IST callback (:data:`PLUGIN_KEYS`) are declared here. The
axolotl pydantic schema (:func:`ist_optim.integrations.axolotl.ist_args_model`), the LLaMA-
Factory route's validation and the tables of docs/axolotl.md and docs/llamafactory.md
(:func:`yaml_keys_table`) are written from these; nothing here needs axolotl, LLaMA-Factory
or pydantic.
"""

from __future__ import annotations

import functools
import operator
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..config import ISTConfig
from ..options import options

__all__ = [
    "IMPORTANCE_SOURCES",
    "LLAMAFACTORY_DEFAULTS",
    "LLAMAFACTORY_NOTES",
    "OPTION_KEYS",
    "PLUGIN_KEYS",
    "PluginKey",
    "YAML_DEFAULTS",
    "YAML_NOTES",
    "schema_type",
    "yaml_keys_table",
    "yaml_option_keys",
    "yaml_rows",
]


def yaml_option_keys(config_cls: type = ISTConfig) -> dict[str, str]:
    """YAML key -> ``ISTOptimizer`` keyword: ``ist_<name>`` for every option declared with
    a YAML key (all but ``memory_shape``, which the plugin fills, and ``active_schedule``,
    a function).

    Example:
        >>> yaml_option_keys()["ist_active_layers"]
        'active_layers'
    """
    return {o.yaml_key: o.name for o in options(config_cls) if o.yaml_key}


#: YAML key -> ``ISTOptimizer`` keyword (meaning and default: ``ist_optim.ISTConfig``).
OPTION_KEYS: dict[str, str] = yaml_option_keys()

#: Values of ``ist_importance_batches``: ``last`` measures the rounds on the latest training
#: batch (the optimizer's default), ``eval`` / ``train`` as in ``add_ist_callback``.
IMPORTANCE_SOURCES = ("last", "eval", "train")


@dataclass(frozen=True)
class PluginKey:
    """A YAML key of the plugin itself (not an ``ISTConfig`` option).

    Attributes:
        annotation: its type in the schema (None: unset).
        default_text: what unset means (markdown).
        help: one line of markdown.
    """

    annotation: Any
    default_text: str
    help: str


#: The plugin's own YAML keys, declared once: the schema and docs/axolotl.md's table are
#: written from them.
PLUGIN_KEYS: dict[str, PluginKey] = {
    "ist_importance_batches": PluginKey(
        str, "`last`", "batches of the importance rounds: `last` (the latest training "
        "batch), `eval` (axolotl's eval split: needs `val_set_size` or `test_datasets`), "
        "`train` (the training set in a fixed shuffled order)"),
    "ist_log_layers": PluginKey(
        bool, "`true`", "log the per-layer `ist/*` keys, not only the scalar ones"),
}
#: What an unset option key means where the axolotl plugin fills it (else ``ISTConfig``'s
#: default).
YAML_DEFAULTS: dict[str, str] = {"seed": "axolotl's `seed`"}
#: What the axolotl plugin adds to an option's meaning.
YAML_NOTES: dict[str, str] = {
    "memory_budget": "the prediction's batch is `micro_batch_size` x `sequence_len`; "
                     "refused with `gradient_checkpointing`",
}
#: The same for ``ist-llamafactory`` (LLaMA-Factory's keys and defaults).
LLAMAFACTORY_DEFAULTS: dict[str, str] = {"seed": "LLaMA-Factory's `seed` (42)"}
LLAMAFACTORY_NOTES: dict[str, str] = {
    "memory_budget": "the prediction's batch is `per_device_train_batch_size` x `cutoff_len` "
                     "(LLaMA-Factory's defaults 8 and 2048)",
}


def schema_type(annotation: Any) -> Any:
    """An option's type as YAML gives it, unset allowed: ``Literal`` names are strings
    (the check names the accepted ones), ``None`` is added.

    Example:
        >>> schema_type(typing.Literal["keep", "drop"] | None), schema_type(int | float)
        (str | None, int | float | None)
    """
    kinds = [k for k in typing.get_args(annotation) if k is not type(None)] or [annotation]
    if typing.get_origin(annotation) is Literal:
        kinds = [str]
    kinds = [str if typing.get_origin(k) is Literal else k for k in kinds]
    return functools.reduce(operator.or_, [*dict.fromkeys(kinds), type(None)])


def yaml_rows(config_cls: type = ISTConfig, *, for_docs: bool = True,
              defaults: dict[str, str] | None = None, notes: dict[str, str] | None = None
              ) -> list[tuple[str, Any, str, str]]:
    """(key, schema type, default in markdown, meaning in markdown) of every YAML key.

    Args:
        config_cls: the options' declaration.
        for_docs: a page in docs/ (the package's own names, links relative to docs/);
            False: the schema's descriptions (every name registered now, no links).
        defaults, notes: the route's words on an option (default :data:`YAML_DEFAULTS`
            and :data:`YAML_NOTES`, axolotl's).

    Example:
        >>> yaml_rows()[-1][:3]
        ('ist_log_layers', bool | None, '`true`')
    """
    defaults = YAML_DEFAULTS if defaults is None else defaults
    notes = YAML_NOTES if notes is None else notes
    rows = []
    for o in options(config_cls):
        if o.yaml_key:
            meaning = o.describe(builtin_only=for_docs, link_prefix="" if for_docs else None)
            if o.name in notes:
                meaning = f"{meaning}; {notes[o.name]}"
            rows.append((o.yaml_key, schema_type(o.annotation),
                         defaults.get(o.name, o.default_doc()), meaning))
    rows += [(key, schema_type(k.annotation), k.default_text, k.help)
             for key, k in PLUGIN_KEYS.items()]
    return rows


def yaml_keys_table(config_cls: type = ISTConfig, *, route: str = "axolotl") -> str:
    """The markdown table of the ``ist_*`` keys (docs/axolotl.md; ``route="llamafactory"``:
    docs/llamafactory.md), from the declarations.

    Example:
        >>> print(yaml_keys_table().splitlines()[2])  # doctest: +ELLIPSIS
        | `ist_active_layers` | `0.25` | layers trained per step `N_u`: an int count, or ... |
    """
    words = {"axolotl": (YAML_DEFAULTS, YAML_NOTES),
             "llamafactory": (LLAMAFACTORY_DEFAULTS, LLAMAFACTORY_NOTES)}
    if route not in words:
        raise ValueError(f"Invalid route: {route!r}; expected one of {sorted(words)}")
    defaults, notes = words[route]
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | {default} | {meaning} |" for key, _kind, default, meaning
              in yaml_rows(config_cls, defaults=defaults, notes=notes)]
    return "\n".join(lines)
