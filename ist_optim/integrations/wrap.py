"""Put an ``ISTOptimizer`` around the optimizer a ``transformers.Trainer`` built: the route of
the axolotl plugin and of ``ist-llamafactory``, which let the trainer build its optimizer
(its class, constructor arguments and param groups) and then wrap it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.optim import Optimizer

from ..optimizer import ISTOptimizer

__all__ = ["wrap_built_optimizer"]

# Keys the Trainer's optimizer construction reads from its kwargs instead of passing them on.
_NOT_CONSTRUCTOR_KEYS = ("params", "model", "optimizer_dict")


def _constructor_kwargs(trainer: Any, inner_cls: type) -> dict[str, Any] | None:
    """The kwargs the trainer built ``inner_cls`` with, or None when unknown."""
    candidates = []
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        candidates.append(trainer.optimizer_cls_and_kwargs)
    get = getattr(trainer, "get_optimizer_cls_and_kwargs", None)
    if get is not None:
        candidates.append(get(trainer.args, trainer.model))
    for cls, kwargs in candidates:
        if cls is inner_cls:
            return {k: v for k, v in kwargs.items() if k not in _NOT_CONSTRUCTOR_KEYS}
    return None


def wrap_built_optimizer(trainer: Any, built: Any, options: Mapping[str, Any],
                         model: nn.Module | None = None) -> ISTOptimizer:
    """Replace ``built``, the optimizer ``trainer`` just built (nothing stepped yet), by
    ``ISTOptimizer(type(built), model, params=<its param groups>, **options,
    **<the trainer's constructor kwargs>)``, set as ``trainer.optimizer``.

    Args:
        trainer: a ``transformers.Trainer`` before ``train()`` steps.
        built: what its ``create_optimizer()`` returned.
        options: ``ISTOptimizer`` keywords.
        model: the model to sample layers of (default: ``trainer.model``).

    Raises:
        RuntimeError: when ``built`` is not a torch optimizer, or was not built from an
            optimizer class and kwargs the trainer can name, or its kwargs collide with
            IST options.

    Example:
        >>> import tempfile, torch
        >>> from transformers import Trainer, TrainingArguments
        >>> net = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(4)))
        >>> args = TrainingArguments(tempfile.mkdtemp(), use_cpu=True, report_to=[],
        ...                          optim="adamw_torch")
        >>> trainer = Trainer(model=net, args=args)
        >>> opt = wrap_built_optimizer(trainer, trainer.create_optimizer(),
        ...                            {"active_layers": 1, "seed": 0, "layers": list(net)})
        >>> trainer.optimizer is opt, type(opt.optimizer).__name__
        (True, 'AdamW')
    """
    model = trainer.model if model is None else model
    if not isinstance(built, Optimizer):
        raise RuntimeError(
            f"the trainer built a {type(built).__name__}, not a torch.optim.Optimizer; IST "
            "wraps torch optimizers (e.g. adamw_torch, adamw_bnb_8bit)")
    inner_cls = type(built)
    kwargs = _constructor_kwargs(trainer, inner_cls)
    if kwargs is None:
        raise RuntimeError(
            f"cannot rebuild {inner_cls.__name__}: the trainer did not build it from an "
            "optimizer class and kwargs (an optimizer factory?); use an optimizer of "
            "transformers' optim names, e.g. adamw_torch or adamw_bnb_8bit")
    clash = sorted(set(kwargs) & set(options))
    if clash:
        raise RuntimeError(f"{inner_cls.__name__}'s kwargs {clash} collide with IST options")
    groups = [dict(group) for group in built.param_groups]
    trainer.optimizer = None
    optimizer = ISTOptimizer(inner_cls, model, params=groups, **options, **kwargs)
    trainer.optimizer = optimizer
    return optimizer
