"""Backward skipping: no backward pass (and no saved activations) below the lowest active layer.

Freezing the weights of inactive layers is not enough when something forces input
gradients: peft and transformers call ``enable_input_require_grads()`` under gradient
checkpointing, which makes the embedding output require grad, so autograd records (and
later runs backward through) every block, trained or not. :class:`BackwardCut` cuts the
graph at the blocks' inputs:

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

Where the cut happens, for each way a block can be checkpointed:

* no checkpointing, recent transformers (5.25; it checkpoints a layer's ``forward``), and
  :class:`~ist_optim.core.recompute.BlockCheckpointer` (``memory_budget``): forward
  pre-hooks on the blocks, which run outside the checkpoint;
* transformers 4.x and 5 up to at least 5.17, which checkpoint ``Module.__call__`` (the
  block's hooks then run inside the checkpoint): the ``_gradient_checkpointing_func``
  that ``gradient_checkpointing_enable()`` sets on the blocks (or, in releases before
  ``GradientCheckpointingLayer``, on the model that loops over them) is wrapped so the
  hidden state is cut *before* the checkpoint; wrapped again whenever it is replaced
  (checked before every forward). Under
  reentrant checkpointing this is the only place the cut can act: the checkpoint links a
  block to the blocks below it before any hook of the block runs;
* ``torch.utils.checkpoint.checkpoint(block, ...)`` called by a model's own code:
  non-reentrant, the hooks cut inside the checkpoint; reentrant, nothing outside the call
  can be reached, so the blocks below still run backward (the updates are unchanged) and a
  warning names ``use_reentrant=False`` as the fix.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

__all__ = ["BackwardCut", "GraphMemo", "reaches_trainable_parameter"]

#: the attribute transformers' ``gradient_checkpointing_enable()`` sets to the checkpoint
#: function on every module that checkpoints (the layers, or the model looping over them)
CHECKPOINT_FUNC_ATTR = "_gradient_checkpointing_func"


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


def _checkpointed_module(function: Any) -> Any:
    """The module a checkpoint function is asked to run: ``block.__call__`` (transformers
    < 4.52), ``partial(super().__call__, **kwargs)`` (4.52 to 5.16) or
    ``partial(forward, block, **kwargs)`` (5.17 and later)."""
    while True:
        owner = getattr(function, "__self__", None)
        if isinstance(owner, nn.Module):
            return owner
        if isinstance(function, nn.Module):
            return function
        if not isinstance(function, functools.partial):
            return None
        if function.args and isinstance(function.args[0], nn.Module):
            return function.args[0]
        function = function.func


def _is_non_reentrant(func: Any) -> bool:
    """Whether ``func`` is a partial of a checkpoint with ``use_reentrant=False`` (its
    checkpoint keeps the graph outside, so the blocks' hooks can cut inside it)."""
    return (isinstance(func, functools.partial)
            and func.keywords.get("use_reentrant", True) is False)


def modules_above(model: nn.Module, blocks: Sequence[nn.Module]) -> list[nn.Module]:
    """The modules of ``model`` that contain one of ``blocks`` (``model`` included), outermost
    first: where a model that loops over its blocks keeps its checkpoint function.

    Example:
        >>> inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> model = torch.nn.Sequential(inner, torch.nn.ReLU())
        >>> modules_above(model, list(inner)) == [model, inner]
        True
    """
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    block_names = [names[id(b)] for b in blocks if id(b) in names]
    return [m for n, m in model.named_modules()
            if any(b != n and (n == "" or b.startswith(n + ".")) for b in block_names)]


class _CutBeforeCheckpoint:
    """A ``_gradient_checkpointing_func`` that cuts the hidden state before calling the
    checkpoint function it replaced (see the module docstring)."""

    def __init__(self, cut: BackwardCut, original: Callable[..., Any]) -> None:
        self.cut = weakref.ref(cut)  # the model must not keep a removed cut alive
        self.original = original

    def __call__(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        cut = self.cut()
        if cut is not None and args and isinstance(args[0], torch.Tensor):
            index = cut.index_of(_checkpointed_module(function))
            if index is not None:
                replaced = cut.cut_input(index, args[0])
                if replaced is not None:
                    args = (replaced, *args[1:])
        return self.original(function, *args, **kwargs)


class BackwardCut:
    """Cuts the autograd graph at the input of the lowest active block, so backward stops
    there (see the module docstring for where the cut happens under each kind of gradient
    checkpointing).

    Usable alone: set the active blocks with :meth:`set_active`, train, and
    :meth:`remove` the hooks. ISTOptimizer uses one internally (``skip_backward=True``).

    Args:
        blocks: the repeated blocks in execution order; the hidden state is their first
            positional argument or the ``hidden_states`` keyword.
        active: indices of the blocks that train (default: none set yet, no cut).
        model: the model the blocks belong to. Its modules that contain the blocks are
            where transformers before 4.52 keeps the checkpoint function (the blocks'
            own are always covered), and a forward pre-hook on it wraps a checkpoint
            function set after this cut was built (``gradient_checkpointing_enable()`` in
            the HF Trainer's ``train()``) before the forward that uses it.

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

    def __init__(self, blocks: Sequence[nn.Module], active: Sequence[int] | None = None, *,
                 model: nn.Module | None = None):
        self.blocks = list(blocks)
        self.lowest: int | None = None
        self._first_input_required_grad = False
        self.cuts = 0  # how many tensors were cut (diagnostics)
        self._memo = GraphMemo()  # graph walks of the current forward pass
        self._index = {id(block): i for i, block in enumerate(self.blocks)}
        self._outputs: dict[int, weakref.ref] = {}  # per block: the last tensor it cut to
        self._uncut: Counter[int] = Counter()  # blocks run uncut inside a reentrant checkpoint
        self._warned_uncut = False
        owners = [*self.blocks, *(modules_above(model, self.blocks) if model is not None
                                  else [])]
        self._owners = list({id(m): m for m in owners}.values())
        self._wrapped: dict[int, tuple[nn.Module, Any]] = {}  # id -> (owner, original func)
        self.handles = [
            block.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
            for i, block in enumerate(self.blocks)
        ]
        if model is not None:
            self.handles.append(model.register_forward_pre_hook(self._before_forward))
        self.wrap_checkpoint_functions()
        if active is not None:
            self.set_active(active)

    def set_active(self, active: Sequence[int]) -> None:
        """Set the trained blocks; the cut goes to the input of the lowest one. (Between
        optimizer steps: every backward of the blocks run uncut is done.)"""
        self.lowest = min(active) if len(active) else None
        self._uncut.clear()
        self.wrap_checkpoint_functions()

    def index_of(self, module: Any) -> int | None:
        """The index of ``module`` among the blocks, or None."""
        return self._index.get(id(module)) if module is not None else None

    # ------------------------------------------------------------ checkpoint functions
    def wrap_checkpoint_functions(self) -> None:
        """Wrap every checkpoint function of the blocks and the modules above them that
        may run a block's hooks inside a reentrant checkpoint (idempotent; a function
        replaced since, e.g. by ``gradient_checkpointing_enable()``, is wrapped anew)."""
        for owner in self._owners:
            func = owner.__dict__.get(CHECKPOINT_FUNC_ATTR)
            if func is None or isinstance(func, _CutBeforeCheckpoint) \
                    or _is_non_reentrant(func):
                continue
            wrapper = _CutBeforeCheckpoint(self, func)
            setattr(owner, CHECKPOINT_FUNC_ATTR, wrapper)
            self._wrapped[id(owner)] = (owner, func)

    def _before_forward(self, _module: nn.Module, _args: tuple) -> None:
        self.wrap_checkpoint_functions()

    # ------------------------------------------------------------ the cut
    def _make_hook(self, index: int) -> Any:
        # a partial of a method, not a closure: models holding the hook stay picklable
        return partial(self._hook, index)

    def _hook(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if index == 0:
            self.wrap_checkpoint_functions()  # a model called below the hooked one
        hidden = _hidden(args, kwargs)
        if self.lowest is None or index > self.lowest or not isinstance(hidden, torch.Tensor):
            return None
        if not torch.is_grad_enabled():
            self._note_reentrant(index, module, hidden)
            return None
        if self._uncut[index]:  # the recomputation of a block that ran uncut: same graph
            self._uncut[index] -= 1
            return None
        cut = self.cut_input(index, hidden)
        return None if cut is None else _replace_hidden(args, kwargs, cut)

    def _note_reentrant(self, index: int, module: nn.Module, hidden: torch.Tensor) -> None:
        """A block's hook without grad mode in training, its input requiring grad: the block
        runs inside a reentrant checkpoint whose input nothing cut. Its recomputation in
        backward must then build the same graph (cutting there would leave the checkpoint
        with no output that requires grad)."""
        if not (module.training and hidden.requires_grad and index < self.lowest
                and not self._is_output(index, hidden)):
            return
        if reaches_trainable_parameter(hidden):
            return
        self._uncut[index] += 1
        if not self._warned_uncut:
            self._warned_uncut = True
            warnings.warn(
                f"IST's backward cut cannot act on block {index}: it runs inside "
                "torch.utils.checkpoint(use_reentrant=True) called by the model's own code, "
                "which links it to the blocks below before any hook runs, so backward still "
                f"runs through the blocks below the lowest active one ({self.lowest}); the "
                "updates are the same. Checkpoint with use_reentrant=False (or through "
                "transformers' gradient_checkpointing_enable(), which IST handles) to skip "
                "them (warned once)", RuntimeWarning, stacklevel=2)

    def _is_output(self, index: int, hidden: torch.Tensor) -> bool:
        ref = self._outputs.get(index)
        return ref is not None and ref() is hidden

    def cut_input(self, index: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """The tensor block ``index`` should receive instead of ``hidden`` (None: keep it).

        Idempotent: a tensor this cut produced for the block is kept as it is.
        """
        if self.lowest is None or index > self.lowest or not torch.is_grad_enabled() \
                or self._is_output(index, hidden):
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
        self._outputs[index] = weakref.ref(cut)
        return cut

    @property
    def nodes_walked(self) -> int:
        """Autograd nodes visited by the graph walks so far (diagnostics)."""
        return self._memo.visits

    def remove(self) -> None:
        """Remove every hook and give back every checkpoint function it wrapped (those
        still wrapped: a function set since stays)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for owner, original in self._wrapped.values():
            current = owner.__dict__.get(CHECKPOINT_FUNC_ATTR)
            if isinstance(current, _CutBeforeCheckpoint) and current.cut() is self:
                setattr(owner, CHECKPOINT_FUNC_ATTR, original)
        self._wrapped.clear()
