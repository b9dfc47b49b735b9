"""Options declared once (issue 33): each ISTConfig field carries its help, check, CLI flag
and YAML key; the CLI, the axolotl schema and the docs' tables are written from them.

``IST_UPDATE_DOCS=1 pytest tests/test_options.py`` rewrites the generated tables in
README.md and docs/ instead of failing on them.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from pathlib import Path

import pytest
import torch

from ist_optim import ISTConfig, ISTOptimizer, register_sampling_rule
from ist_optim.cli.parser import build_parser, ist_flags_table, ist_kwargs_from_args, parse_args
from ist_optim.cli.recipe import RECIPE_DEFAULTS, apply_recipe
from ist_optim.config import options_table
from ist_optim.integrations import axolotl as plugin
from ist_optim.integrations.yaml_keys import (
    OPTION_KEYS,
    PLUGIN_KEYS,
    YAML_DEFAULTS,
    YAML_NOTES,
    yaml_keys_table,
    yaml_option_keys,
)
from ist_optim.options import at_least, option, options
from ist_optim.sampling.rules import UniformRule

ROOT = Path(__file__).resolve().parents[1]

#: The flags and keys users had before issue 33 (kept; new ones may only be added).
FLAGS_BEFORE = {"active_layers", "update_interval", "suppressed_layers", "num_candidates",
                "score_lr", "suppression", "sampling", "dense_steps"}
KEYS_BEFORE = {"active_layers", "update_interval", "estimator", "sampling", "state_policy",
               "memory_budget", "budget_redraws", "seed", "suppressed_layers",
               "num_candidates", "score_lr", "suppression", "freeze_inactive", "depth_window",
               "dense_steps", "ramp_steps", "skip_nonfinite"}


# ---------------------------------------------------------------------- the declaration
def test_every_field_is_declared_once_with_a_one_line_help():
    declared = options(ISTConfig)
    assert [o.name for o in declared] == [f.name for f in dataclasses.fields(ISTConfig)]
    assert ISTConfig.option_names() == tuple(o.name for o in declared)
    for o in declared:
        assert o.help and "\n" not in o.help and "|" not in o.help
        assert o.name in ISTConfig.__doc__  # the docstring's Attributes are written too


def test_defaults_pass_their_own_checks():
    for o in options(ISTConfig):
        o.check(o.name, o.default)


def test_a_field_without_a_declaration_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Undeclared(ISTConfig):
        flavour: int = 3

    with pytest.raises(TypeError, match=r"Undeclared.flavour is not declared with option"):
        options(Undeclared)


@pytest.mark.parametrize("help_text", ["two\nlines", "a | b"])
def test_a_help_that_breaks_a_table_row_is_refused(help_text):
    with pytest.raises(ValueError, match="one line without"):
        option(1, help_text, check=at_least(1))


# ---------------------------------------------------------------------- the walk-through
def _walkthrough_config() -> type:
    """``ISTConfig`` plus the field of docs/extending.md's "A new option", as written there."""
    section = (ROOT / "docs" / "extending.md").read_text().split("## A new option", 1)[1]
    field_code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {"dataclasses": dataclasses, "ISTConfig": ISTConfig, "option": option,
                 "at_least": at_least, "__name__": __name__}
    exec("@dataclasses.dataclass(frozen=True)\nclass WithFlavour(ISTConfig):\n" + field_code,
         namespace)
    return namespace["WithFlavour"]


WithFlavour = _walkthrough_config()


def test_adding_an_option_is_one_field(capsys):
    """The walk-through of docs/extending.md, its code run as written: the new field is
    checked, has a CLI flag that reaches the optimizer's keywords, a YAML key in the schema,
    and a row in each table."""
    assert WithFlavour().flavours == 3 and WithFlavour(flavours=5).flavours == 5
    with pytest.raises(ValueError, match="Invalid flavours: 0; expected an int >= 1"):
        WithFlavour(flavours=0)
    args = parse_args(["--flavours", "4", "--active-layers", "2"], config_cls=WithFlavour)
    assert ist_kwargs_from_args(args, WithFlavour) == {"active_layers": 2, "flavours": 4}
    with pytest.raises(SystemExit):
        parse_args(["--flavours", "0"], config_cls=WithFlavour)
    assert "Invalid flavours: 0" in capsys.readouterr().err
    assert yaml_option_keys(WithFlavour)["ist_flavours"] == "flavours"
    assert plugin.ist_options({"ist_flavours": 2}, config_cls=WithFlavour) == {"flavours": 2}
    with pytest.raises(ValueError, match="^ist_flavours: Invalid flavours: 0"):
        plugin.ist_options({"ist_flavours": 0}, config_cls=WithFlavour)
    assert "| `flavours` | `3` | flavours per step `F` |" in options_table(WithFlavour)
    assert "| `--flavours` | `3` | flavours per step `F` |" in ist_flags_table(WithFlavour)
    assert "| `ist_flavours` | `3` | flavours per step `F` |" in yaml_keys_table(WithFlavour)
    pydantic = pytest.importorskip("pydantic")
    schema = plugin.ist_args_model(WithFlavour)
    assert schema(ist_flavours=2).ist_flavours == 2
    with pytest.raises(pydantic.ValidationError, match="ist_flavours: Invalid flavours: 0"):
        schema(ist_flavours=0)
    assert "ist_flavours" not in plugin.ISTArgs.model_fields  # ISTConfig's own is untouched


# ---------------------------------------------------------------------- the interfaces
def _ist_group_flags(parser) -> set[str]:
    group = next(g for g in parser._action_groups if g.title.startswith("IST"))
    return {a.dest for a in group._group_actions} - {"ist_kwarg"}


def test_cli_flags_are_exactly_the_declared_ones():
    parser = build_parser()
    declared = {o.name for o in options(ISTConfig) if o.cli}
    assert _ist_group_flags(parser) == declared
    assert FLAGS_BEFORE <= declared
    for o in options(ISTConfig):
        assert parser.get_default(o.name) is None or o.name == "seed"  # unset: None
        if o.cli:
            assert o.cli_flag == "--" + o.name.replace("_", "-")


def test_ist_kwarg_help_lists_every_option_without_a_flag():
    text = " ".join(build_parser().format_help().split())
    listed = re.search(r"any other ISTOptimizer keyword \(([^)]*)\)", text).group(1)
    expected = [o.name for o in options(ISTConfig)
                if not o.cli and o.name not in ("seed", "active_schedule")]
    assert listed.split(", ") == expected


def test_recipe_defaults_name_exactly_the_flags_the_recipe_fills():
    args = parse_args(["--steps", "10"])
    unset = {o.name for o in options(ISTConfig) if o.cli}
    apply_recipe(args)
    assert {name for name in unset if getattr(args, name) is not None} == set(RECIPE_DEFAULTS)


def test_yaml_keys_are_exactly_the_declared_ones_and_the_plugins():
    declared = {o.yaml_key: o.name for o in options(ISTConfig) if o.yaml}
    assert OPTION_KEYS == declared and plugin.OPTION_KEYS is OPTION_KEYS
    assert {f"ist_{name}" for name in KEYS_BEFORE} <= set(OPTION_KEYS)
    assert {o.name for o in options(ISTConfig) if not o.yaml} == {"memory_shape",
                                                                   "active_schedule"}
    assert set(YAML_DEFAULTS) | set(YAML_NOTES) <= set(OPTION_KEYS.values())
    pytest.importorskip("pydantic")
    assert set(plugin.ISTArgs.model_fields) == set(OPTION_KEYS) | set(PLUGIN_KEYS)


def test_new_yaml_keys_reach_the_optimizer():
    options_ = plugin.ist_options({"ist_suppression_mode": "residual", "ist_scale_decay": 0.5,
                                   "ist_advantage_scale": 0.2, "ist_score_retention": 1.0,
                                   "ist_skip_backward": False})
    assert ISTConfig(**options_).suppression_mode == "residual"
    with pytest.raises(ValueError, match="^ist_scale_decay: Invalid scale_decay: 1.0"):
        plugin.ist_options({"ist_scale_decay": 1.0})


class ListedRule(UniformRule):
    name = "test-options-listed"


def test_choices_are_read_from_the_registry_when_asked():
    """A rule registered after import is accepted and listed by the CLI and the schema
    (run time), but not by the tables in files (the package's own names only)."""
    register_sampling_rule(ListedRule)
    assert ISTConfig(sampling="test-options-listed").sampling == "test-options-listed"
    assert parse_args(["--sampling", "test-options-listed"]).sampling == "test-options-listed"
    assert "test-options-listed" in " ".join(build_parser().format_help().split())
    assert "test-options-listed" not in options_table()
    assert "test-options-listed" not in yaml_keys_table()
    pytest.importorskip("pydantic")
    plugin.ist_args_model.cache_clear()
    try:
        assert "test-options-listed" in plugin.ISTArgs.model_fields["ist_sampling"].description
    finally:
        plugin.ist_args_model.cache_clear()


# ---------------------------------------------------------------------- the docs' tables
TABLES = [
    ("docs/usage.md", "options table", "ist_optim.config.options_table()", options_table),
    ("docs/axolotl.md", "ist_* keys table",
     "ist_optim.integrations.yaml_keys.yaml_keys_table()", yaml_keys_table),
    ("docs/cli.md", "IST flags table", "ist_optim.cli.parser.ist_flags_table()",
     ist_flags_table),
    ("docs/llamafactory.md", "ist_* keys table (LLaMA-Factory)",
     'ist_optim.integrations.yaml_keys.yaml_keys_table(route="llamafactory")',
     lambda: yaml_keys_table(route="llamafactory")),
]


@pytest.mark.parametrize(("path", "label", "source", "table"), TABLES,
                         ids=[t[0] for t in TABLES])
def test_docs_tables_are_the_generated_ones(path, label, source, table):
    """A row missing, extra or different in a docs table fails here."""
    file = ROOT / path
    text = file.read_text()
    begin = (f"<!-- {label}: written by {source}; tests/test_options.py checks it -->\n")
    end = f"<!-- end of {label} -->"
    assert text.count(begin) == 1 and text.count(end) == 1, f"{path}: markers not found"
    start, stop = text.index(begin) + len(begin), text.index(end)
    expected = f"\n{table()}\n\n"  # blank lines: the comments stay out of the table
    if os.environ.get("IST_UPDATE_DOCS") and text[start:stop] != expected:
        file.write_text(text[:start] + expected + text[stop:])
        return
    assert text[start:stop] == expected, (
        f"{path}'s {label} differs from {source}; run IST_UPDATE_DOCS=1 pytest "
        "tests/test_options.py to rewrite it")


def _readme_arguments() -> list[str]:
    text = (ROOT / "docs" / "usage.md").read_text()
    table = text.split("takes, besides the options:\n\n", 1)[1].split("\n\n", 1)[0]
    return [re.match(r"\| `([^`]+)`", row).group(1) for row in table.splitlines()[2:]]


def test_readme_lists_every_constructor_argument_besides_the_options():
    signature = inspect.signature(ISTOptimizer.__init__).parameters.values()
    keyword_only = [p.name for p in signature if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert sorted(_readme_arguments()) == sorted([*keyword_only, "**optimizer_kwargs"])
    assert not set(keyword_only) & set(ISTConfig.option_names())


def test_the_optimizer_takes_every_declared_option():
    blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
    values = {"active_layers": 2, "dense_steps": 1, "skip_nonfinite": True}
    opt = ISTOptimizer(torch.optim.SGD, torch.nn.Sequential(*blocks), lr=0.1,
                       layers=list(blocks), **values)
    assert {k: getattr(opt.config, k) for k in values} == values
