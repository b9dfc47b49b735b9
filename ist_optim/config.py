"""``ISTConfig``: every IST option in one frozen object, validated once at construction.

``ISTOptimizer(..., **options)`` builds one from its keywords (or takes ``config=``); the
pieces it composes (sampler, importance rounds, layer activator) read their settings from
it. This module is a leaf of the package: it holds the option names, their validators and
the name lists (sampling rules and estimators come from :mod:`ist_optim.registry`), and
imports nothing else of the package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sized
from dataclasses import dataclass, fields
from typing import Any, Literal

from torch import nn
from torch.optim import Optimizer

from .registry import estimator, estimator_names, sampling_rule, sampling_rule_names

__all__ = [
    "ISTConfig",
    "check_adalora",
    "check_count",
    "STATE_POLICIES",
    "SUPPRESSION_MODES",
    "StatePolicy",
    "SuppressionMode",
    "check_importance_batches",
    "check_int",
    "check_number",
    "check_optimizer_and_model",
    "parse_memory_budget",
    "split_options",
]

StatePolicy = Literal["keep", "offload", "drop"]
"""Where the optimizer state of inactive layers lives (see :class:`ist_optim.StateResidency`)."""
STATE_POLICIES: tuple[str, ...] = ("keep", "offload", "drop")
SuppressionMode = Literal["auto", "adapters", "residual"]
SUPPRESSION_MODES: tuple[str, ...] = ("auto", "adapters", "residual")


_UNITS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_PATTERN = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)")


def _budget_error(value: Any) -> ValueError:
    return ValueError(f"Invalid memory_budget: {value!r}; expected a positive number of bytes "
                      f"(int) or a string like '24GiB' or '512MiB' (units: "
                      f"{', '.join(_UNITS)})")


def parse_memory_budget(value: int | str) -> int:
    """Bytes of a memory budget: an int, or a number with a unit (``"24GiB"``, ``"1.5 GB"``).

    Units are ``B``, decimal ``kB MB GB TB`` and binary ``KiB MiB GiB TiB``, spelled
    exactly so; fractions of a byte are rounded down.

    Raises:
        TypeError: for anything but an int or a str (bools included).
        ValueError: for a malformed string, an unknown unit, or a budget below 1 byte.

    Example:
        >>> parse_memory_budget("24GiB"), parse_memory_budget("1.5 kB"), parse_memory_budget(512)
        (25769803776, 1500, 512)
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"memory_budget must be an int (bytes) or a string like '24GiB', got "
                        f"{value!r}")
    if isinstance(value, int):
        nbytes = value
    else:
        match = _PATTERN.fullmatch(value.strip())
        if match is None or match.group(2) not in _UNITS:
            raise _budget_error(value)
        number, unit = match.groups()
        if "." in number:
            whole, frac = number.split(".")
            nbytes = (int(whole + frac) * _UNITS[unit]) // 10 ** len(frac)  # exact
        else:
            nbytes = int(number) * _UNITS[unit]
    if nbytes < 1:
        raise _budget_error(value)
    return nbytes




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


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {choices}")


def _check_optional_bool(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool or None, got {value!r}")


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
    ``TypeError``/``ValueError`` naming it and the accepted range.

    Attributes:
        active_layers: layers trained per step ``N_u``, an int or a fraction of the
            layers (``max(1, int(f L))``); 0.25.
        suppressed_layers: layers damped per candidate set ``N_s``, int or fraction; 0.5.
        num_candidates: candidate sets ``K`` per importance round (distinct, >= 2); 3.
        score_lr: step size ``eta`` of the score update; 10.0.
        suppression: factor ``lambda`` on the suppressed responses, in [0, 1); 0.25.
        update_interval: steps ``T`` between importance rounds (first after step ``T``); 10.
        sampling: the sampling rule (:mod:`ist_optim.sampling.rules`): ``"importance"``
            (weights ``sigmoid(-s)``, the paper), ``"uniform"`` (LISA-style, no rounds),
            ``"depth-aware"`` (importance weights, drawn clustered in depth so the
            backward stops higher), or any registered rule (docs/extending.md).
        estimator: how a round measures importance: ``"paper"``, ``"normalized"`` or
            ``"first-order"`` (see :mod:`ist_optim.importance.estimators`), or a registered one.
        suppression_mode: ``"auto"``, ``"adapters"`` (peft adapters damped) or
            ``"residual"`` (block outputs ``x + lambda (f(x) - x)``), see
            :class:`ist_optim.Suppressor`.
        freeze_inactive: ``True``: ``requires_grad=False`` on inactive layers, so backward
            skips their weight gradients; ``False``: static ``requires_grad``, inactive
            gradients computed but kept out of the update (needed by AdaLoRA).
        state_policy: where the optimizer state of inactive layers lives: ``"keep"``,
            ``"offload"`` (host memory, bit-exact) or ``"drop"``; ``None``: ``"offload"``
            on CUDA, else ``"keep"`` (see
            :func:`ist_optim.memory.residency.resolve_state_policy`).
        skip_backward: cut the autograd graph at the input of the lowest active layer
            (:class:`ist_optim.BackwardCut`); ``None``: ``freeze_inactive``.
        seed: seed of the private ``torch.Generator``; ``None``: OS entropy (rank 0's
            under ``torch.distributed``). Global RNGs are never used.
        advantage_scale: ``tau`` of the ``"normalized"``/``"first-order"`` estimators
            (0.1): standardized advantages are multiplied by it.
        score_retention: ``rho`` (0.9): scores keep this fraction at each such round.
        scale_decay: ``beta`` (0.9): weight of the past in the running loss spread.
        depth_window: width of the ``"depth-aware"`` window, ``None`` for
            ``min(2 * active, layers)``.
        memory_budget: device memory a step may use, bytes or a string like ``"24GiB"``
            (see :func:`parse_memory_budget`); ``None``: no budget. Each step then
            checkpoints the fewest blocks that make its predicted peak fit (see
            :class:`ist_optim.memory.budget.CheckpointPolicy`); needs ``memory_shape`` or a
            ``memory_planner``.
        memory_shape: ``(batch_size, seq_len)`` of the largest training batch, for the
            memory prediction of ``memory_budget``.
        budget_redraws: draws made again, at most, while the drawn set does not fit
            ``memory_budget`` without checkpointing (0: every draw is taken).
        dense_steps: every layer trains in the first ``dense_steps`` steps, then
            ``active_layers`` (see :class:`ist_optim.ActiveSchedule`); 0.
        ramp_steps: after the dense steps, the count falls linearly from every layer to
            ``active_layers`` over ``ramp_steps`` steps; 0.
        active_schedule: any ``callable(step) -> count or fraction`` instead of
            ``dense_steps``/``ramp_steps`` (``step``: optimizer steps taken so far).
        skip_nonfinite: skip the whole step when a gradient the update would apply (active
            layers and the outside group) holds a NaN or an infinity, as
            ``torch.amp.GradScaler`` does: parameters, optimizer state, the step count and
            the active set stay as they were, on every rank together; skipped steps are
            counted (:attr:`ist_optim.ISTOptimizer.skipped_steps`, the checkpoint, the
            Trainer logs). ``False`` (default): every step is taken, as by the inner
            optimizer. Not with a closure (the closure computes the gradients inside).

    Example:
        >>> ISTConfig(active_layers=2, sampling="uniform").runs_rounds
        False
        >>> ISTConfig(score_lr=float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: Invalid score_lr: nan; expected a number in [0.0, inf)
    """

    active_layers: int | float = 0.25
    suppressed_layers: int | float = 0.5
    num_candidates: int = 3
    score_lr: float = 10.0
    suppression: float = 0.25
    update_interval: int = 10
    sampling: str = "importance"
    estimator: str = "paper"
    suppression_mode: SuppressionMode = "auto"
    freeze_inactive: bool = True
    state_policy: StatePolicy | None = None
    skip_backward: bool | None = None
    seed: int | None = None
    advantage_scale: float = 0.1
    score_retention: float = 0.9
    scale_decay: float = 0.9
    depth_window: int | None = None
    memory_budget: int | str | None = None
    memory_shape: tuple[int, int] | None = None
    budget_redraws: int = 0
    dense_steps: int = 0
    ramp_steps: int = 0
    active_schedule: Callable[[int], int | float] | None = None
    skip_nonfinite: bool = False

    def __post_init__(self) -> None:
        check_count("active_layers", self.active_layers)
        check_count("suppressed_layers", self.suppressed_layers)
        check_int("num_candidates", self.num_candidates, 2)
        check_number("score_lr", self.score_lr, 0.0, math.inf, closed_high=False)
        check_number("suppression", self.suppression, 0.0, 1.0, closed_high=False)
        check_int("update_interval", self.update_interval, 1)
        _check_choice("sampling", self.sampling, sampling_rule_names())
        _check_choice("estimator", self.estimator, estimator_names())
        _check_choice("suppression_mode", self.suppression_mode, SUPPRESSION_MODES)
        if not self.runs_rounds and self.estimator != "paper":
            raise ValueError(
                f"estimator={self.estimator!r} has no effect with sampling="
                f"{self.sampling!r}, which runs no importance rounds; use "
                "sampling='importance' or 'depth-aware'"
            )
        for flag in ("freeze_inactive", "skip_nonfinite"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.state_policy is not None and self.state_policy not in STATE_POLICIES:
            raise ValueError(
                f"Invalid state_policy: {self.state_policy!r}; expected one of "
                f"{STATE_POLICIES} or None for the device default"
            )
        _check_optional_bool("skip_backward", self.skip_backward)
        if self.skip_backward and not self.freeze_inactive:
            raise ValueError(
                "skip_backward=True needs freeze_inactive=True: with every layer requiring "
                "grad there is nothing below the lowest active layer to cut"
            )
        if self.seed is not None and (isinstance(self.seed, bool)
                                      or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        check_number("advantage_scale", self.advantage_scale, 0.0, math.inf, closed_high=False)
        check_number("score_retention", self.score_retention, 0.0, 1.0, closed_high=True)
        check_number("scale_decay", self.scale_decay, 0.0, 1.0, closed_high=False)
        if self.depth_window is not None:
            check_int("depth_window", self.depth_window, 1)
        self._check_memory_options()
        self._check_schedule()

    def _check_schedule(self) -> None:
        check_int("dense_steps", self.dense_steps, 0)
        check_int("ramp_steps", self.ramp_steps, 0)
        rule = self.active_schedule
        if rule is None:
            return
        if not callable(rule):
            raise TypeError(f"active_schedule must be callable(step) -> layer count, got "
                            f"{rule!r}")
        if self.dense_steps or self.ramp_steps:
            raise ValueError(
                f"active_schedule is set together with dense_steps={self.dense_steps} / "
                f"ramp_steps={self.ramp_steps}; write the dense phase into the rule, or "
                "drop active_schedule")

    def _check_memory_options(self) -> None:
        check_int("budget_redraws", self.budget_redraws, 0)
        if self.budget_redraws and self.memory_budget is None:
            raise ValueError(
                f"budget_redraws={self.budget_redraws} is set but memory_budget is not; "
                "pass memory_budget= (and memory_shape=) too, or drop budget_redraws")
        if self.memory_budget is not None:
            parse_memory_budget(self.memory_budget)
            if not self.freeze_inactive:
                raise ValueError(
                    "memory_budget needs freeze_inactive=True: with every layer computing "
                    "gradients, the active set does not change the memory of a step")
        shape = self.memory_shape
        if shape is None:
            return
        if self.memory_budget is None:
            raise ValueError("memory_shape is set but memory_budget is not; pass "
                             "memory_budget= too, or drop memory_shape")
        if (not isinstance(shape, tuple | list) or len(shape) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape)):
            raise ValueError(f"Invalid memory_shape: {shape!r}; expected (batch_size, seq_len), "
                             "two ints >= 1: the largest batch a step trains on")

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
        return tuple(f.name for f in fields(cls))


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
