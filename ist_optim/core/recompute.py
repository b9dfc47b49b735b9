"""``BlockCheckpointer``: activation checkpointing switched on and off per block, per step.

Two kinds of block are handled:

* transformers decoder layers (``GradientCheckpointingLayer``, transformers >= 4.53): their
  own per-layer switch, the ``gradient_checkpointing`` attribute, with
  ``_gradient_checkpointing_func`` set to non-reentrant :func:`torch.utils.checkpoint.checkpoint`;
* any other module: its ``forward`` is replaced, while checkpointed, by one that runs the
  original ``forward`` under non-reentrant :func:`torch.utils.checkpoint.checkpoint`
  (in training mode with grad enabled, as transformers does).

Either way the checkpoint wraps ``forward``, not ``Module.__call__``, so forward pre-hooks
(:class:`ist_optim.BackwardCut`'s cut) run once, outside the recomputation.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["BlockCheckpointer", "is_checkpoint_managed"]

_MISSING = object()
_MANAGED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # blocks of a live checkpointer


def is_checkpoint_managed(block: nn.Module) -> bool:
    """Whether a :class:`BlockCheckpointer` (``ISTOptimizer(memory_budget=...)``) switches
    ``block``'s checkpointing per step (until its ``remove()``).

    Example:
        >>> block = torch.nn.Linear(2, 2)
        >>> ckpt = BlockCheckpointer([block]); is_checkpoint_managed(block)
        True
        >>> ckpt.remove(); is_checkpoint_managed(block)
        False
    """
    return block in _MANAGED


def _is_hf_layer(module: nn.Module) -> bool:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers not installed, or too old for per-layer switches
        return False
    return isinstance(module, GradientCheckpointingLayer)


class _CheckpointedForward:
    """``module.forward`` replaced by a checkpointed call of the original one."""

    def __init__(self, module: nn.Module, forward: Any) -> None:
        self.module = module
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.module.training and torch.is_grad_enabled():
            return checkpoint(functools.partial(self.forward, **kwargs), *args,
                              use_reentrant=False)
        return self.forward(*args, **kwargs)


class BlockCheckpointer:
    """Turns activation checkpointing on for exactly the blocks given to :meth:`set`.

    Building one changes nothing; the first :meth:`set` writes every block's setting.

    Args:
        blocks: the repeated blocks, in execution order.

    Example:
        >>> blocks = [torch.nn.Linear(2, 2) for _ in range(3)]
        >>> ckpt = BlockCheckpointer(blocks)
        >>> ckpt.set([0, 2]); ckpt.checkpointed
        [0, 2]
        >>> blocks[2](torch.ones(1, 2)).sum().backward()   # recomputed in backward
        >>> ckpt.remove(); ckpt.checkpointed
        []
    """

    def __init__(self, blocks: Iterable[nn.Module]) -> None:
        self.blocks = list(blocks)
        self.checkpointed: list[int] = []
        self._func = functools.partial(checkpoint, use_reentrant=False)
        self._hf = [_is_hf_layer(b) for b in self.blocks]
        #: whether any block was set to checkpoint before (transformers' own switch or a
        #: replaced ``forward`` of this class); this object now decides
        self.took_over = any(bool(getattr(b, "gradient_checkpointing", False))
                             or isinstance(b.__dict__.get("forward"), _CheckpointedForward)
                             for b in self.blocks)
        # what each block had before, restored by remove()
        self._saved: list[tuple[Any, Any]] = []
        for block, hf in zip(self.blocks, self._hf, strict=True):
            if hf:
                self._saved.append((block.__dict__.get("gradient_checkpointing", _MISSING),
                                    block.__dict__.get("_gradient_checkpointing_func",
                                                       _MISSING)))
            else:
                self._saved.append((block.__dict__.get("forward", _MISSING), None))
        _MANAGED.update(self.blocks)

    def set(self, indices: Sequence[int]) -> None:
        """Checkpoint the blocks ``indices`` from the next forward on; no others.

        Raises:
            ValueError: for an index that is not a block.
        """
        wanted = sorted(set(indices))
        bad = [i for i in wanted if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"blocks {bad} out of range: there are {len(self.blocks)} blocks")
        on = set(wanted)
        for i, block in enumerate(self.blocks):
            if self._hf[i]:  # (re)written each time: a Trainer may have set its own
                block._gradient_checkpointing_func = self._func
                block.gradient_checkpointing = i in on
                continue
            current = block.__dict__.get("forward")
            wrapped = isinstance(current, _CheckpointedForward)
            if i in on and not wrapped:
                block.forward = _CheckpointedForward(block, block.forward)
            elif i not in on and wrapped:
                self._unwrap_forward(i)
        self.checkpointed = wanted

    def _unwrap_forward(self, index: int) -> None:
        """The block's ``forward`` without any checkpointing wrapper, also one another
        checkpointer put there before this one took over."""
        block = self.blocks[index]
        inner = block.__dict__["forward"]
        while isinstance(inner, _CheckpointedForward):
            inner = inner.forward
        if getattr(inner, "__func__", None) is type(block).forward and \
                getattr(inner, "__self__", None) is block:
            del block.forward  # the class's own forward
        else:
            block.forward = inner

    def changed_elsewhere(self) -> bool:
        """Whether a block's checkpointing differs from what :meth:`set` made it (e.g. the
        HF Trainer's ``gradient_checkpointing=True`` switched every layer on)."""
        on = set(self.checkpointed)
        for i, block in enumerate(self.blocks):
            if self._hf[i]:
                if (bool(block.gradient_checkpointing) != (i in on)
                        or block.__dict__.get("_gradient_checkpointing_func") is not self._func):
                    return True
            elif isinstance(block.__dict__.get("forward"), _CheckpointedForward) != (i in on):
                return True
        return False

    def _restore_forward(self, index: int) -> None:
        block, original = self.blocks[index], self._saved[index][0]
        if original is _MISSING:
            del block.forward
        else:
            block.forward = original

    def remove(self) -> None:
        """Give every block back its own checkpointing setting and ``forward``."""
        for block in self.blocks:
            _MANAGED.discard(block)
        for i, block in enumerate(self.blocks):
            if self._hf[i]:
                for name, value in zip(("gradient_checkpointing",
                                        "_gradient_checkpointing_func"), self._saved[i],
                                       strict=True):
                    if value is _MISSING:
                        block.__dict__.pop(name, None)
                    else:
                        setattr(block, name, value)
            elif (isinstance(block.__dict__.get("forward"), _CheckpointedForward)
                  or isinstance(self._saved[i][0], _CheckpointedForward)):
                self._restore_forward(i)  # also a wrapper set() took off
        self.checkpointed = []
