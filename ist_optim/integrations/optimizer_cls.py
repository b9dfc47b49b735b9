"""``ist_optimizer_cls``: an ISTOptimizer class bound to a model, for optimizer-class APIs.

The Trainer's ``optimizer_cls_and_kwargs=(cls, kwargs)`` builds the optimizer as
``cls(param_groups, **kwargs)`` (param groups with the TrainingArguments' weight decay);
``ISTOptimizer`` also needs the model, which the class returned here carries.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ..optimizer import ISTOptimizer

__all__ = ["ist_optimizer_cls"]

_RESERVED = ("params", "model", "optimizer_cls")


def ist_optimizer_cls(
    model: nn.Module, optimizer_cls: type[Optimizer], **ist_kwargs: Any
) -> type[ISTOptimizer]:
    """An ``ISTOptimizer`` subclass whose constructor takes ``(params, **kwargs)`` like any
    torch optimizer, with ``model``, ``optimizer_cls`` and ``ist_kwargs`` bound.

    Args:
        model: the model the optimizer will train (the one given to the Trainer).
        optimizer_cls: the inner optimizer class (``torch.optim.AdamW``,
            ``bitsandbytes.optim.AdamW8bit``, ...).
        **ist_kwargs: keyword arguments of :class:`ist_optim.ISTOptimizer` (and, if you
            like, of the inner optimizer). The class's own ``**kwargs`` are added to them;
            a key given in both raises ``TypeError``.

    Returns:
        A subclass of :class:`ist_optim.ISTOptimizer` named ``IST<optimizer_cls name>``.

    Example:
        >>> import torch
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
        >>> model = torch.nn.Sequential(*blocks)
        >>> cls = ist_optimizer_cls(model, torch.optim.AdamW, layers=list(blocks), seed=0)
        >>> cls.__name__
        'ISTAdamW'
        >>> opt = cls(model.parameters(), lr=1e-3)  # what the Trainer does
        >>> opt.num_layers, opt.param_groups[0]["lr"]
        (4, 0.001)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(
            f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
        )
    reserved = sorted(set(ist_kwargs) & set(_RESERVED))
    if reserved:
        raise TypeError(
            f"ist_optimizer_cls got {reserved}: the Trainer passes the parameters, and the "
            "model and optimizer class are the first two arguments"
        )
    bound = dict(ist_kwargs)

    class BoundISTOptimizer(ISTOptimizer):
        def __init__(self, params: Iterable[Any], **optimizer_kwargs: Any) -> None:
            both = sorted(set(optimizer_kwargs) & set(bound))
            if both:
                raise TypeError(
                    f"{type(self).__name__} got {both} both in ist_optimizer_cls(...) and in "
                    "the constructor's kwargs; give each once"
                )
            super().__init__(optimizer_cls, model, params=params, **bound, **optimizer_kwargs)

    name = f"IST{optimizer_cls.__name__}"
    BoundISTOptimizer.__name__ = BoundISTOptimizer.__qualname__ = name
    BoundISTOptimizer.__doc__ = (
        f"ISTOptimizer around {optimizer_cls.__name__}, bound to a "
        f"{type(model).__name__}; built as {name}(params, **kwargs)."
    )
    return BoundISTOptimizer
