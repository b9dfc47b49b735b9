"""``ISTConfig``: every IST option in one frozen object, validated once at construction.

``ISTOptimizer(..., **options)`` builds one from its keywords (or takes ``config=``); the
pieces it composes (sampler, importance rounds, layer activator) read their settings from
it. Each option is declared once, as a field with :func:`ist_optim.options.option`: its
default, help, check, CLI flag and YAML key; the CLI, the axolotl schema and the README's
table are built from those fields (docs/extending.md, "A new option").

This module also holds the one parser of sizes in bytes (:func:`parse_bytes`). It is a
leaf of the package: it imports only :mod:`ist_optim.options` and :mod:`ist_optim.registry`
(the names of sampling rules and estimators, read at run time).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn
from torch.optim import Optimizer

from .options import (
    Choices,
    at_least,
    check_count,
    check_int,
    check_number,
    is_bool,
    markdown_table,
    number_in,
    one_of,
    option,
    optional,
    options,
)
from .registry import estimator, estimator_names, sampling_rule, sampling_rule_names

__all__ = [
    "BYTE_UNITS",
    "ISTConfig",
    "STATE_POLICIES",
    "SUPPRESSION_MODES",
    "StatePolicy",
    "SuppressionMode",
    "check_adalora",
    "check_count",
    "check_importance_batches",
    "check_int",
    "check_number",
    "check_optimizer_and_model",
    "options_table",
    "parse_bytes",
    "parse_memory_budget",
    "split_options",
]

StatePolicy = Literal["keep", "offload", "drop"]
"""Where the optimizer state of inactive layers lives (see :class:`ist_optim.StateResidency`)."""
STATE_POLICIES: tuple[str, ...] = ("keep", "offload", "drop")
SuppressionMode = Literal["auto", "adapters", "residual"]
SUPPRESSION_MODES: tuple[str, ...] = ("auto", "adapters", "residual")


# ---------------------------------------------------------------------- sizes in bytes
#: The units of a size, spelled exactly so: decimal (powers of 10) and binary (of 2).
BYTE_UNITS: dict[str, int] = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_UNIT_BY_LOWER = {unit.lower(): unit for unit in BYTE_UNITS}


def _unit_fix(number: str, unit: str) -> str:
    """What to write instead of an unknown ``unit``."""
    if unit.lower() in _UNIT_BY_LOWER:
        return f"units are case-sensitive: write '{number}{_UNIT_BY_LOWER[unit.lower()]}'"
    if unit.lower() in ("k", "m", "g", "t"):
        prefix = unit.upper()
        return (f"'{unit}' is ambiguous: write '{number}{prefix}iB' (binary) or "
                f"'{number}{'k' if prefix == 'K' else prefix}B' (decimal)")
    return f"unknown unit {unit!r}; use one of {', '.join(BYTE_UNITS)}"


def _bytes_of_text(text: str, name: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"Invalid {name}: {text!r}; expected a number and a unit like "
                         f"'24GiB' or '1.5 GB' (units: {', '.join(BYTE_UNITS)})")
    number, unit = match.groups()
    if not unit:
        raise ValueError(f"Invalid {name}: {text!r} has no unit; write '{number}GiB' "
                         f"(2**30 bytes each) or '{number}GB' (10**9), or '{number}B' for bytes")
    if unit not in BYTE_UNITS:
        raise ValueError(f"Invalid {name}: {text!r}; {_unit_fix(number, unit)}")
    if "." in number:
        whole, frac = number.split(".")
        return (int(whole + frac) * BYTE_UNITS[unit]) // 10 ** len(frac)  # exact
    return int(number) * BYTE_UNITS[unit]


def parse_bytes(value: int | str, name: str = "size") -> int:
    """A size in bytes, by the one rule of every place that reads one.

    The rule: an ``int`` is a number of bytes; a string is a number and a unit, ``B``,
    decimal ``kB MB GB TB`` or binary ``KiB MiB GiB TiB``, spelled exactly so, with an
    optional space (``"24GiB"``, ``"1.5 GB"``). A string without a unit (``"24"``) is
    refused, never guessed: written sizes are gigabytes as often as bytes. Fractions of a
    byte are rounded down; a size is at least 1 byte. ``ISTConfig(memory_budget=...)``,
    ``ist-finetune plan --budget`` and the axolotl key ``ist_memory_budget`` read sizes
    with it.

    Args:
        value: the size.
        name: what the size is, for the error (``"memory_budget"``, ``"--budget"``).

    Raises:
        TypeError: for anything but an int or a str (bools and floats included).
        ValueError: one line naming the value and what to write instead.

    Example:
        >>> parse_bytes("24GiB"), parse_bytes("1.5 kB"), parse_bytes(512)
        (25769803776, 1500, 512)
        >>> parse_bytes("24", "--budget")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Invalid --budget: '24' has no unit; write '24GiB' (2**30 bytes each) or ...
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{name} must be an int (bytes) or a string with a unit like "
                        f"'24GiB', got {value!r}")
    nbytes = value if isinstance(value, int) else _bytes_of_text(value, name)
    if nbytes < 1:
        raise ValueError(f"Invalid {name}: {value!r}; expected a size of at least 1 byte")
    return nbytes


def parse_memory_budget(value: int | str) -> int:
    """Bytes of a ``memory_budget``: :func:`parse_bytes` naming ``memory_budget``.

    Example:
        >>> parse_memory_budget("24GiB"), parse_memory_budget(512)
        (25769803776, 512)
    """
    return parse_bytes(value, "memory_budget")


# ---------------------------------------------------------------------- option checks
def _check_state_policy(name: str, value: Any) -> None:
    if value is not None and value not in STATE_POLICIES:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {STATE_POLICIES} or "
                         "None for the device default")


def _check_seed(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} must be an int or None, got {value!r}")


def _check_optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool or None, got {value!r}")


def _check_shape(name: str, shape: Any) -> None:
    if shape is not None and (
            not isinstance(shape, tuple | list) or len(shape) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape)):
        raise ValueError(f"Invalid {name}: {shape!r}; expected (batch_size, seq_len), two "
                         "ints >= 1: the largest batch a step trains on")


def _check_schedule_rule(name: str, rule: Any) -> None:
    if rule is not None and not callable(rule):
        raise TypeError(f"{name} must be callable(step) -> layer count, got {rule!r}")


_SAMPLING = Choices(sampling_rule_names, "sampling rule",
                    lambda name: sampling_rule(name).__module__)
_ESTIMATORS = Choices(estimator_names, "estimator", lambda name: estimator(name).__module__)
_SUPPRESSION_MODES = Choices(lambda: SUPPRESSION_MODES, "suppression mode")
_STATE_POLICIES = Choices(lambda: STATE_POLICIES, "state policy")
_FRACTION = number_in(0.0, 1.0, closed_high=False)
_NON_NEGATIVE = number_in(0.0, float("inf"), closed_high=False)


def check_optimizer_and_model(optimizer_cls: Any, model: Any, loss_fn: Any) -> None:
    """Type checks of ``ISTOptimizer``'s positional arguments and ``loss_fn``.

    Example:
        >>> import torch
        >>> check_optimizer_and_model(torch.optim.SGD, torch.nn.Linear(2, 2), None)
    """
    if isinstance(optimizer_cls, Optimizer):
        raise TypeError(
            f"optimizer_cls must be an optimizer class, got an instance of "
            f"{type(optimizer_cls).__name__}; pass e.g. torch.optim.AdamW and its kwargs"
        )
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(model, batch) -> loss, got {loss_fn!r}")


def check_adalora(model: nn.Module, freeze_inactive: bool) -> None:
    """Refuse AdaLoRA with ``freeze_inactive=True``: its rank allocator
    (``update_and_allocate``) reads the gradient of every adapter after each step, and
    frozen layers have none.

    Example:
        >>> import torch
        >>> check_adalora(torch.nn.Linear(2, 2), freeze_inactive=True)
    """
    if not freeze_inactive:
        return
    try:
        from peft.tuners.adalora import AdaLoraLayer
    except ImportError:  # peft not installed: no AdaLoRA
        return
    if any(isinstance(module, AdaLoraLayer) for module in model.modules()):
        raise ValueError(
            "AdaLoRA's rank allocator (model.base_model.update_and_allocate) reads every "
            "adapter's gradient after each step, but freeze_inactive=True leaves inactive "
            "layers without one; pass freeze_inactive=False (every gradient is computed, "
            "only the active layers are updated)"
        )


def check_importance_batches(config: ISTConfig, batches: Any) -> None:
    """Refuse ``importance_batches`` that no round would use, or that hold no batch."""
    if batches is None:
        return
    if not config.runs_rounds:
        raise ValueError(
            f"importance_batches is set but sampling={config.sampling!r} runs no importance "
            "rounds; drop importance_batches or use sampling='importance' or 'depth-aware'"
        )
    if not config.uses_batches:
        raise ValueError(
            f"importance_batches is set but estimator={config.estimator!r} runs no "
            "estimation forward passes; drop importance_batches"
        )
    if isinstance(batches, Sized) and len(batches) == 0:
        raise ValueError(
            "importance_batches is empty; pass at least one batch (a list of batches or a "
            "DataLoader), or drop it to measure the latest training batch"
        )


@dataclass(frozen=True)
class ISTConfig:
    """The IST options of an :class:`ist_optim.ISTOptimizer`: the one place where their
    names, defaults and meaning are written (defaults are the paper's).

    ``ISTOptimizer(AdamW, model, lr=..., active_layers=0.5)`` and
    ``ISTOptimizer(AdamW, model, config=ISTConfig(active_layers=0.5), lr=...)`` are the
    same. Every field is checked when the object is built; a bad value raises a one-line
    ``TypeError``/``ValueError`` naming it and the accepted range. Each field is declared
    with :func:`ist_optim.options.option` (help, check, CLI flag, YAML key); the list
    below is written from those declarations.

    Attributes: (written from the fields)

    Example:
        >>> ISTConfig(active_layers=2, sampling="uniform").runs_rounds
        False
        >>> ISTConfig(score_lr=float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: Invalid score_lr: nan; expected a number in [0.0, inf)
    """

    active_layers: int | float = option(
        0.25, "layers trained per step `N_u`: an int count, or a fraction of the layers "
        "(`max(1, int(f L))`)", check=check_count, cli=True)
    suppressed_layers: int | float = option(
        0.5, "layers damped per candidate set `N_s` of an importance round: an int count "
        "or a fraction", check=check_count, cli=True)
    num_candidates: int = option(
        3, "candidate sets `K` per importance round (distinct; re-drawn if equal)",
        check=at_least(2), cli=True)
    score_lr: float = option(
        10.0, "step size `eta` of the score update", check=_NON_NEGATIVE, cli=True)
    suppression: float = option(
        0.25, "damping factor `lambda` on the suppressed responses, in [0, 1)",
        check=_FRACTION, cli=True)
    update_interval: int = option(
        10, "steps `T` between importance rounds (the first after step `T`)",
        check=at_least(1), cli=True)
    sampling: str = option(
        "importance", "the rule that draws each step's layers, by name: {choices} "
        "(docs/extending.md registers more). `importance`: weights `sigmoid(-s)` (the paper); "
        "`uniform`: LISA-style, no importance rounds; `depth-aware`: importance weights, "
        "drawn clustered in depth so the backward stops higher",
        check=one_of(_SAMPLING), choices=_SAMPLING, cli=True)
    estimator: str = option(
        "paper", "how an importance round measures importance, by name: {choices} "
        "(docs/extending.md registers more). `normalized`: loss-scale-free, bounded "
        "scores; `first-order`: no extra forwards, read from the training backward; see "
        "docs/importance.md",
        check=one_of(_ESTIMATORS), choices=_ESTIMATORS)
    suppression_mode: SuppressionMode = option(
        "auto", "what a round damps: {choices}. `adapters`: the peft adapters' outputs; "
        "`residual`: block outputs `x + lambda (f(x) - x)`; `auto`: adapters when peft "
        "adapters are present, else residual", check=one_of(_SUPPRESSION_MODES),
        choices=_SUPPRESSION_MODES)
    freeze_inactive: bool = option(
        True, "`True`: `requires_grad=False` on inactive layers, so backward skips their "
        "weight gradients; `False`: static `requires_grad`, inactive gradients computed but "
        "kept out of the update (gated updates; needed by AdaLoRA)", check=is_bool)
    state_policy: StatePolicy | None = option(
        None, "where the optimizer state of inactive layers lives: {choices} (`offload`: "
        "host memory, bit-exact; `drop`: freed); `None`: the device default; see "
        "docs/memory.md", check=_check_state_policy, choices=_STATE_POLICIES,
        default_text='`"offload"` on CUDA, else `"keep"`')
    skip_backward: bool | None = option(
        None, "cut the autograd graph at the input of the lowest active layer "
        "(`BackwardCut`), so no backward runs below it", check=_check_optional_bool,
        default_text="`None` (= `freeze_inactive`)")
    seed: int | None = option(
        None, "seed of the private `torch.Generator` (rank 0's under `torch.distributed`); "
        "global RNGs are never used. Not an ist-finetune flag: its `--seed` seeds the run "
        "and IST", check=_check_seed, default_text="OS entropy")
    advantage_scale: float = option(
        0.1, "`tau` of the `normalized`/`first-order` estimators: standardized advantages "
        "are multiplied by it", check=_NON_NEGATIVE)
    score_retention: float = option(
        0.9, "`rho`: share of the scores kept at each round of those estimators",
        check=number_in(0.0, 1.0, closed_high=True))
    scale_decay: float = option(
        0.9, "`beta`: weight of the past in their running loss spread", check=_FRACTION)
    depth_window: int | None = option(
        None, "window width of `sampling=\"depth-aware\"`", check=optional(at_least(1)),
        default_text="`min(2 N_u, L)`")
    memory_budget: int | str | None = option(
        None, "device memory per step, an int number of bytes or a string with a unit "
        "(`\"24GiB\"`, `\"512MiB\"`; a string without one is refused): each step "
        "checkpoints only the blocks it needs to fit (none when its active set fits); "
        "needs `memory_shape` (transformers Llama-style models) or `memory_planner=`; see "
        "docs/memory.md#training-inside-a-memory-budget-memory_budget",
        check=optional(lambda name, value: parse_bytes(value, name)),
        default_text="`None` (no budget)")
    memory_shape: tuple[int, int] | None = option(
        None, "`(batch_size, seq_len)` of the largest training batch, for the memory "
        "prediction of `memory_budget` (the axolotl plugin sets it from `micro_batch_size` "
        "and `sequence_len`)", check=_check_shape, yaml=False)
    budget_redraws: int = option(
        0, "with `memory_budget`: draw the active set again, up to this many times, while "
        "it does not fit without checkpointing (first fitting set taken, else the last "
        "draw); meant for `sampling=\"depth-aware\"`, every layer keeps a chance to train",
        check=at_least(0))
    dense_steps: int = option(
        0, "every layer trains in the first `dense_steps` steps, then `active_layers` (an "
        "active-set schedule, like an LR warm-up; under `memory_budget` the dense steps "
        "checkpoint what they need)", check=at_least(0), cli=True)
    ramp_steps: int = option(
        0, "after the dense steps, the count falls linearly from every layer to "
        "`active_layers` over `ramp_steps` steps", check=at_least(0))
    active_schedule: Callable[[int], int | float] | None = option(
        None, "any `callable(step) -> count or fraction` instead of `dense_steps`/"
        "`ramp_steps` (`step`: optimizer steps taken so far)", check=_check_schedule_rule,
        yaml=False)
    skip_nonfinite: bool = option(
        False, "skip the whole step, on every rank, when a gradient it would apply (active "
        "layers and the outside group) holds a NaN or an infinity, as `torch.amp.GradScaler` "
        "does: parameters, optimizer state, step count and active set unchanged; counted in "
        "`opt.skipped_steps`, the checkpoint and the Trainer logs. Not with a closure",
        check=is_bool)

    def __post_init__(self) -> None:
        for declared in options(type(self)):
            declared.check(declared.name, getattr(self, declared.name))
        if not self.runs_rounds and self.estimator != "paper":
            raise ValueError(
                f"estimator={self.estimator!r} has no effect with sampling="
                f"{self.sampling!r}, which runs no importance rounds; use "
                "sampling='importance' or 'depth-aware'"
            )
        if self.skip_backward and not self.freeze_inactive:
            raise ValueError(
                "skip_backward=True needs freeze_inactive=True: with every layer requiring "
                "grad there is nothing below the lowest active layer to cut"
            )
        self._check_memory_options()
        if self.active_schedule is not None and (self.dense_steps or self.ramp_steps):
            raise ValueError(
                f"active_schedule is set together with dense_steps={self.dense_steps} / "
                f"ramp_steps={self.ramp_steps}; write the dense phase into the rule, or "
                "drop active_schedule")

    def _check_memory_options(self) -> None:
        if self.budget_redraws and self.memory_budget is None:
            raise ValueError(
                f"budget_redraws={self.budget_redraws} is set but memory_budget is not; "
                "pass memory_budget= (and memory_shape=) too, or drop budget_redraws")
        if self.memory_budget is not None and not self.freeze_inactive:
            raise ValueError(
                "memory_budget needs freeze_inactive=True: with every layer computing "
                "gradients, the active set does not change the memory of a step")
        if self.memory_shape is not None and self.memory_budget is None:
            raise ValueError("memory_shape is set but memory_budget is not; pass "
                             "memory_budget= too, or drop memory_shape")

    @property
    def memory_budget_bytes(self) -> int | None:
        """``memory_budget`` in bytes (None: no budget)."""
        return None if self.memory_budget is None else parse_memory_budget(self.memory_budget)

    @property
    def runs_rounds(self) -> bool:
        """Whether importance rounds run (the sampling rule reads scores: every built-in
        rule but ``"uniform"``)."""
        return bool(sampling_rule(self.sampling).runs_rounds)

    @property
    def uses_batches(self) -> bool:
        """Whether the rounds measure batches (not ``estimator="first-order"``)."""
        return self.runs_rounds and bool(estimator(self.estimator).uses_batches)

    @property
    def cuts_backward(self) -> bool:
        """``skip_backward``, defaulting to ``freeze_inactive``."""
        return self.freeze_inactive if self.skip_backward is None else self.skip_backward

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The names of the IST options (the fields), as ``ISTOptimizer`` takes them.

        Example:
            >>> "active_layers" in ISTConfig.option_names()
            True
        """
        return tuple(declared.name for declared in options(cls))


def split_options(config: ISTConfig | None, kwargs: dict[str, Any]) -> ISTConfig:
    """The config of ``config=`` or of the IST option keywords in ``kwargs`` (popped from
    it; what is left goes to the inner optimizer).

    Example:
        >>> kwargs = {"lr": 1e-3, "active_layers": 2}
        >>> split_options(None, kwargs).active_layers, kwargs
        (2, {'lr': 0.001})
    """
    options = {name: kwargs.pop(name) for name in ISTConfig.option_names() if name in kwargs}
    if config is None:
        return ISTConfig(**options)
    if not isinstance(config, ISTConfig):
        raise TypeError(f"config must be an ist_optim.ISTConfig, got {type(config).__name__}")
    if options:
        raise ValueError(
            f"config= is given together with the IST options {sorted(options)}; set them in "
            f"the config (dataclasses.replace(config, {next(iter(options))}=...)) or drop "
            "config=")
    return config


def _attributes_doc(config_cls: type) -> str:
    """The ``Attributes:`` section of ``config_cls``'s docstring, from its declarations."""
    lines = ["    Attributes:"]
    for declared in options(config_cls):
        text = (f"{declared.name}: {declared.describe()}. Default "
                f"{declared.default_doc()}.")
        lines += textwrap.wrap(text, 92, initial_indent=" " * 8, subsequent_indent=" " * 12,
                               break_on_hyphens=False)
    return "\n".join(lines)


def options_table(config_cls: type = ISTConfig, *, link_prefix: str | None = "") -> str:
    """The table of the options (option, default, meaning) in docs/usage.md, from the
    fields (``link_prefix``: what links to other docs pages start with).

    ``tests/test_options.py`` fails when docs/usage.md's table is not this one.

    Example:
        >>> print(options_table().splitlines()[0])
        | option | default | meaning |
    """
    return markdown_table(config_cls, link_prefix=link_prefix)


ISTConfig.__doc__ = (ISTConfig.__doc__ or "").replace(
    "    Attributes: (written from the fields)", _attributes_doc(ISTConfig))
