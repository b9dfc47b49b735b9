"""Find the ISTOptimizer inside the wrappers that accelerate and the Trainer put around it."""

from __future__ import annotations

from typing import Any

from ..optimizer import ISTOptimizer

__all__ = ["DDP_UNUSED_REASON", "DEEPSPEED_REFUSAL", "unwrap_ist_optimizer"]

#: The one line every route (the axolotl plugin, ist-llamafactory, the Trainer callback)
#: refuses DeepSpeed with (docs/distributed.md, "DeepSpeed").
DEEPSPEED_REFUSAL = (
    "IST does not run under DeepSpeed: ZeRO fixes the trainable set when it builds its "
    "partitions (frozen layers keep moving through zero-filled gradients), and IST changes "
    "it every step; use FSDP2 (or DDP) instead (docs/distributed.md)")

#: Why the axolotl plugin and ist-llamafactory need DDP's unused-parameter search (and no
#: reentrant checkpointing, which defeats it) once IST freezes the layers that sit out.
DDP_UNUSED_REASON = ("under DDP: the layers IST leaves out of a step get no gradient, so DDP "
                     "must look for unused parameters")

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
