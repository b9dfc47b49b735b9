"""Helpers shared by the integrations: find the ISTOptimizer inside wrappers, count state."""

from __future__ import annotations

from typing import Any

import torch

from ..optimizer import ISTOptimizer

__all__ = ["optimizer_state_bytes", "unwrap_ist_optimizer"]

_MAX_DEPTH = 8


def unwrap_ist_optimizer(optimizer: Any) -> ISTOptimizer:
    """The :class:`~ist_optim.ISTOptimizer` inside ``optimizer``'s ``.optimizer`` wrappers
    (accelerate's ``AcceleratedOptimizer``, the Trainer's ``self.optimizer``), or itself.

    Raises:
        TypeError: when no ``ISTOptimizer`` is found, naming what was found instead.

    Example:
        >>> import torch
        >>> from ist_optim import ISTOptimizer
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
        >>> opt = ISTOptimizer(torch.optim.SGD, torch.nn.Sequential(*blocks), lr=0.1,
        ...                    layers=list(blocks), sampling="uniform")
        >>> class Wrapper:  # what accelerate's AcceleratedOptimizer looks like
        ...     def __init__(self, optimizer):
        ...         self.optimizer = optimizer
        >>> unwrap_ist_optimizer(Wrapper(opt)) is opt
        True
    """
    current = optimizer
    for _ in range(_MAX_DEPTH):
        if isinstance(current, ISTOptimizer):
            return current
        inner = getattr(current, "optimizer", None)
        if inner is None or inner is current:
            break
        current = inner
    raise TypeError(
        f"expected an ISTOptimizer (possibly wrapped by accelerate), got "
        f"{type(optimizer).__name__} wrapping {type(current).__name__}; build the optimizer "
        "with ISTOptimizer(...) or ist_optim.integrations.ist_optimizer_cls(...)"
    )


def optimizer_state_bytes(optimizer: ISTOptimizer) -> int:
    """Bytes of the tensors held in the inner optimizer's per-parameter state
    (Adam moments, 8-bit quantisation statistics, step counters), shared storage
    counted once.

    Example:
        >>> import torch
        >>> from ist_optim import ISTOptimizer
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4, bias=False) for _ in range(2))
        >>> model = torch.nn.Sequential(*blocks)
        >>> opt = ISTOptimizer(torch.optim.AdamW, model, lr=0.1, layers=list(blocks),
        ...                    active_layers=1, sampling="uniform", seed=0)
        >>> optimizer_state_bytes(opt)
        0
        >>> model(torch.ones(1, 4)).sum().backward(); opt.step()
        >>> optimizer_state_bytes(opt)  # exp_avg + exp_avg_sq (16 floats each) + step
        132
    """
    seen: set[tuple[str, int]] = set()
    total = 0
    for per_param in optimizer.optimizer.state.values():
        values = per_param.values() if isinstance(per_param, dict) else [per_param]
        for value in values:
            if not isinstance(value, torch.Tensor):
                continue
            storage = value.untyped_storage()
            key = (str(value.device), storage.data_ptr())
            if storage.data_ptr() != 0 and key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total
