"""Backward skipping: no backward pass (and no saved activations) below the lowest active layer.

Freezing the weights of inactive layers is not enough when something forces input
gradients: peft and transformers call ``enable_input_require_grads()`` under gradient
checkpointing, which makes the embedding output require grad, so autograd records (and
later runs backward through) every block, trained or not. :class:`BackwardCut` installs
forward pre-hooks on the blocks that cut the graph:

* below the lowest active block, a hidden-state input that requires grad is detached, so
  frozen blocks record no graph and save no activations;
* at the lowest active block, the input becomes a fresh leaf that requires grad exactly
  when the model's first block input did (reentrant checkpointing needs an input that
  requires grad), so backward stops there.

A tensor is only ever cut when its autograd graph reaches no ``nn.Parameter`` that
requires grad (checked by walking the graph), so no parameter's gradient can change:
with trained embeddings or any trainable parameter below, nothing is cut. Non-parameter
leaves (the input-require-grads trick, or user inputs that require grad) lose their
gradient through the cut; that is the point of the cut.

Hooks run in ``Module.__call__``, outside the checkpointed ``forward`` of transformers
layers, so the cut works with reentrant and non-reentrant gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

__all__ = ["BackwardCut", "GraphMemo", "reaches_trainable_parameter"]


class GraphMemo:
    """What earlier walks of one forward pass learned about autograd nodes.

    A node from which a trainable parameter is reachable makes every tensor computed from
    it reach one too; nodes fully explored without finding one need no second visit. With
    a memo, walking the inputs of all blocks of a forward costs the graph's size once,
    not once per block.
    """

    def __init__(self) -> None:
        self.reaching: set[Any] = set()
        self.not_reaching: set[Any] = set()
        self.visits = 0  # nodes visited by all walks so far (diagnostics; not cleared)

    def clear(self) -> None:
        self.reaching.clear()
        self.not_reaching.clear()


def reaches_trainable_parameter(tensor: torch.Tensor, memo: GraphMemo | None = None) -> bool:
    """Whether ``tensor``'s autograd graph leads to an ``nn.Parameter`` that requires grad.

    Args:
        tensor: any tensor.
        memo: results of earlier walks over the same graph (see :class:`GraphMemo`);
            updated with this walk's.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> reaches_trainable_parameter(w * 2), reaches_trainable_parameter(torch.ones(2))
        (True, False)
    """
    if not tensor.requires_grad:
        return False
    if tensor.grad_fn is None:
        return isinstance(tensor, nn.Parameter)
    memo = memo if memo is not None else GraphMemo()
    stack, seen = [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in memo.not_reaching:
            continue
        variable = getattr(node, "variable", None)
        if node in memo.reaching or (isinstance(variable, nn.Parameter)
                                     and variable.requires_grad):
            memo.reaching.add(tensor.grad_fn)
            return True
        seen.add(node)
        memo.visits += 1
        stack.extend(fn for fn, _ in node.next_functions)
    memo.not_reaching.update(seen)
    return False


def _hidden(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


def _replace_hidden(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


class BackwardCut:
    """Forward pre-hooks on ``blocks`` that stop backward at the lowest active block.

    Usable alone: set the active blocks with :meth:`set_active`, train, and
    :meth:`remove` the hooks. ISTOptimizer uses one internally (``skip_backward=True``).

    Args:
        blocks: the repeated blocks in execution order; the hidden state is their first
            positional argument or the ``hidden_states`` keyword.
        active: indices of the blocks that train (default: none set yet, no cut).

    Example:
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
        >>> _ = blocks.requires_grad_(False); _ = blocks[2].requires_grad_(True)
        >>> cut = BackwardCut(list(blocks), active=[2])
        >>> x = torch.ones(1, 2, requires_grad=True)   # input grads forced
        >>> out = blocks[2](blocks[1](blocks[0](x))).sum()
        >>> out.backward(); x.grad is None, blocks[2].weight.grad is not None
        (True, True)
        >>> cut.remove()
    """

    def __init__(self, blocks: Sequence[nn.Module], active: Sequence[int] | None = None):
        self.blocks = list(blocks)
        self.lowest: int | None = None
        self._first_input_required_grad = False
        self.cuts = 0  # how many tensors were cut (diagnostics)
        self._memo = GraphMemo()  # graph walks of the current forward pass
        self.handles = [
            block.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
            for i, block in enumerate(self.blocks)
        ]
        if active is not None:
            self.set_active(active)

    def set_active(self, active: Sequence[int]) -> None:
        """Set the trained blocks; the cut goes to the input of the lowest one."""
        self.lowest = min(active) if len(active) else None

    def _make_hook(self, index: int) -> Any:
        # a partial of a method, not a closure: models holding the hook stay picklable
        return partial(self._hook, index)

    def _hook(self, index: int, _module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.lowest is None or index > self.lowest or not torch.is_grad_enabled():
            return None
        hidden = _hidden(args, kwargs)
        if not isinstance(hidden, torch.Tensor):
            return None
        if index == 0:
            self._first_input_required_grad = hidden.requires_grad
            self._memo.clear()
        try:
            if reaches_trainable_parameter(hidden, self._memo):
                return None
        finally:
            if index == self.lowest:
                self._memo.clear()  # hold no autograd node past this forward
        if index < self.lowest:
            if not hidden.requires_grad:
                return None
            cut = hidden.detach()
        else:  # the lowest active block
            wanted = self._first_input_required_grad or hidden.requires_grad
            if hidden.requires_grad == wanted and hidden.grad_fn is None:
                return None  # already a leaf of the right kind
            cut = hidden.detach().requires_grad_(wanted)
        self.cuts += 1
        return _replace_hidden(args, kwargs, cut)

    @property
    def nodes_walked(self) -> int:
        """Autograd nodes visited by the graph walks so far (diagnostics)."""
        return self._memo.visits

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
