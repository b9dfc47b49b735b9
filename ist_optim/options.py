"""Checks of ISTOptimizer's arguments: one clear error per bad value, naming the fix."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.optim import Optimizer

from .estimators import ESTIMATORS
from .residency import STATE_POLICIES

__all__ = [
    "SAMPLINGS",
    "Sampling",
    "check_batches_usable",
    "check_choices",
    "check_int",
    "check_number",
    "collect_params",
    "resolve_skip_backward",
]

Sampling = Literal["importance", "uniform", "depth-aware"]
SAMPLINGS = ("importance", "uniform", "depth-aware")


def check_number(name: str, value: Any, low: float, high: float, *, closed_high: bool) -> float:
    """``value`` as a float in ``[low, high]`` (or ``[low, high)``), else a named error.

    Example:
        >>> check_number("suppression", 0.25, 0.0, 1.0, closed_high=False)
        0.25
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    ok = low <= value <= high if closed_high else low <= value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"Invalid {name}: {value}; expected a value in [{low}, {high}{bracket}")
    return float(value)


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int ``>= low``, else a named error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"Invalid {name}: {value}; expected an int >= {low}")
    return value


def check_choices(
    optimizer_cls: Any,
    model: Any,
    sampling: Any,
    estimator: Any,
    state_policy: Any,
    seed: Any,
    loss_fn: Any,
) -> None:
    """Type and choice checks of the arguments that need no model inspection."""
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
    if sampling not in SAMPLINGS:
        raise ValueError(f"Invalid sampling: {sampling!r}; expected one of {SAMPLINGS}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"Invalid estimator: {estimator!r}; expected one of {ESTIMATORS}")
    if sampling == "uniform" and estimator != "paper":
        raise ValueError(
            f"estimator={estimator!r} has no effect with sampling='uniform', which runs no "
            "importance rounds; use sampling='importance' or 'depth-aware'"
        )
    if state_policy is not None and state_policy not in STATE_POLICIES:
        raise ValueError(
            f"Invalid state_policy: {state_policy!r}; expected one of {STATE_POLICIES} "
            "or None for the device default"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(model, batch) -> loss, got {loss_fn!r}")


def resolve_skip_backward(freeze_inactive: Any, skip_backward: Any) -> bool:
    """``skip_backward`` defaults to ``freeze_inactive``; the cut needs frozen layers."""
    if not isinstance(freeze_inactive, bool):
        raise TypeError(f"freeze_inactive must be a bool, got {freeze_inactive!r}")
    if skip_backward is None:
        return freeze_inactive
    if not isinstance(skip_backward, bool):
        raise TypeError(f"skip_backward must be a bool or None, got {skip_backward!r}")
    if skip_backward and not freeze_inactive:
        raise ValueError(
            "skip_backward=True needs freeze_inactive=True: with every layer requiring "
            "grad there is nothing below the lowest active layer to cut"
        )
    return skip_backward


def check_batches_usable(sampling: str, estimator: str, importance_batches: Any) -> None:
    """Refuse ``importance_batches`` where no estimation forward pass would use them."""
    if importance_batches is None:
        return
    if sampling == "uniform":
        raise ValueError(
            "importance_batches is set but sampling='uniform' runs no importance rounds; "
            "drop importance_batches or use sampling='importance' or 'depth-aware'"
        )
    if estimator == "first-order":
        raise ValueError(
            "importance_batches is set but estimator='first-order' runs no estimation "
            "forward passes; drop importance_batches"
        )


def collect_params(
    model: nn.Module, params: Iterable[Any] | None
) -> tuple[list[Any], list[torch.Tensor]]:
    """The params (or groups) for the inner optimizer, and the flat list of tensors.

    Default: every parameter of ``model`` that requires grad now.
    """
    if params is None:
        chosen: list[Any] = [p for p in model.parameters() if p.requires_grad]
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no parameter with requires_grad=True; add "
                "adapters (peft) or unfreeze the weights to train, or pass params="
            )
    else:
        chosen = list(params)
    if chosen and isinstance(chosen[0], dict):
        trainable = [p for group in chosen for p in group["params"]]
    else:
        trainable = list(chosen)
    if not trainable:
        raise ValueError("params is empty; pass at least one parameter to train")
    return chosen, trainable
