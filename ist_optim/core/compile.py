"""``torch.compile`` for IST: compile each block's ``forward`` once, shared by all blocks.

Compiling the whole model (``torch.compile(model)``, the HF Trainer's ``torch_compile=True``)
does not suit IST: every adapter weight's ``requires_grad`` is a guard of the whole-model
graph, every step freezes a different set of layers, so every new active set recompiles
until dynamo hits its ``recompile_limit`` (8) and falls back to eager for good.

:func:`compile_blocks` compiles the ``forward`` of the repeated block class instead, once
for all blocks. Parameters are graph inputs (dynamo inlines ``nn.Module`` s), so every block
hits the same compiled code; what varies is a small constant set of variants (the block's
adapters frozen or trained x its input requiring grad or not x grad mode, at most 8),
whatever the number of steps or layers. Module hooks run in ``Module.__call__``, outside the
compiled ``forward``, so IST's backward cut (:class:`ist_optim.BackwardCut`) and its
batch capture stay in eager Python and keep working.
"""

from __future__ import annotations

import inspect
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .groups import discover_layers
from .recompute import is_checkpoint_managed

__all__ = ["WholeModelCompileGuard", "check_not_compiled_whole", "compile_blocks",
           "is_compiled_block"]

_ROUTE = (
    "compile the blocks instead: ist_optim.compile_blocks(optimizer) (once, after building "
    "the ISTOptimizer)"
)


def _optimized_module_type() -> type:
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


def is_compiled_block(block: nn.Module) -> bool:
    """Whether :func:`compile_blocks` compiled ``block``'s ``forward``.

    Example:
        >>> is_compiled_block(torch.nn.Linear(2, 2))
        False
    """
    own = block.__dict__.get("forward")
    func = getattr(own, "__func__", None)
    original = getattr(func, "_torchdynamo_orig_callable", None)
    if original is None:
        return False
    return inspect.unwrap(original) is inspect.unwrap(type(block).forward)


def check_not_compiled_whole(model: nn.Module, freeze_inactive: bool) -> None:
    """Refuse a model compiled as a whole (``torch.compile(model)``) when IST freezes layers.

    Raises:
        ValueError: naming the supported route (:func:`compile_blocks`), when ``model`` is
            a ``torch.compile`` wrapper and ``freeze_inactive`` is true (with static
            ``requires_grad``, ``freeze_inactive=False``, nothing recompiles).

    Example:
        >>> check_not_compiled_whole(torch.nn.Linear(2, 2), freeze_inactive=True)
    """
    if freeze_inactive and isinstance(model, _optimized_module_type()):
        raise ValueError(
            "the model is compiled as a whole (torch.compile(model)): IST freezes a different "
            "set of layers every step and each set recompiles the whole graph until dynamo "
            f"gives up and runs eager; pass the uncompiled model and {_ROUTE}"
        )


class WholeModelCompileGuard:
    """Catches a model compiled as a whole *after* the optimizer was built.

    ``torch.compile(model)`` (or ``model.compile()``) applied after construction leaves the
    ``model`` object the optimizer holds as it was, so :func:`check_not_compiled_whole`
    cannot see it. A forward pre-hook on ``model`` notes whether its call is being traced by
    dynamo (``torch.compiler.is_compiling()``, true only when the whole model's call is
    compiled; blocks compiled by :func:`compile_blocks` run the model's hooks in eager
    Python); :meth:`check` raises at the next optimizer step.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> guard = WholeModelCompileGuard(model)
        >>> _ = model(torch.ones(1, 2)); guard.check()  # eager: nothing to say
        >>> guard.remove()
    """

    def __init__(self, model: nn.Module) -> None:
        self.compiled_call_seen = False
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, _args: Any) -> None:
        if torch.compiler.is_compiling():
            self.compiled_call_seen = True

    def check(self) -> None:
        """Raise when a compiled whole-model call was seen.

        Raises:
            RuntimeError: naming :func:`compile_blocks`, the supported route.
        """
        if self.compiled_call_seen:
            raise RuntimeError(
                "the model was compiled as a whole (torch.compile(model) or model.compile()) "
                "after the ISTOptimizer was built: IST freezes a different set of layers every "
                "step and each set recompiles the whole graph until dynamo gives up and runs "
                f"eager; train the uncompiled model and {_ROUTE}")

    def remove(self) -> None:
        self._handle.remove()


def _blocks_and_model(target: nn.Module | torch.optim.Optimizer) -> tuple[list[nn.Module],
                                                                          nn.Module]:
    if isinstance(target, torch.optim.Optimizer):
        groups, model = getattr(target, "layer_groups", None), getattr(target, "model", None)
        if groups is None or not isinstance(model, nn.Module):
            raise TypeError(
                f"compile_blocks takes a model or an ISTOptimizer, got {type(target).__name__}"
                " (unwrap it first: ist_optim.integrations.unwrap_ist_optimizer(opt))"
            )
        return list(groups.modules), model
    if not isinstance(target, nn.Module):
        raise TypeError(
            f"compile_blocks takes a model or an ISTOptimizer, got {type(target).__name__}"
        )
    trainable = [p for p in target.parameters() if p.requires_grad]
    return [module for _, module in discover_layers(target, None, trainable)], target


def _check_blocks(blocks: list[nn.Module], model: nn.Module) -> None:
    check_not_compiled_whole(model, freeze_inactive=True)
    for index, block in enumerate(blocks):
        own = block.__dict__.get("forward")
        if own is not None and not is_compiled_block(block):
            raise ValueError(
                f"block {index} ({type(block).__name__}) has its own `forward` attribute (set "
                "by accelerate's device-map hooks or by hand); compile_blocks compiles the "
                "class's forward shared by all blocks: remove that attribute first"
            )
        if is_checkpoint_managed(block):
            raise ValueError(
                f"block {index} ({type(block).__name__}) has its checkpointing switched per "
                "step by an ISTOptimizer's memory_budget; compiled blocks and per-step "
                "checkpointing do not mix (torch 2.13 fails to compile a checkpointed block "
                "that records no graph): drop memory_budget, or leave the blocks uncompiled"
            )
        if getattr(block, "gradient_checkpointing", False):
            raise ValueError(
                f"block {index} ({type(block).__name__}) has gradient checkpointing on; in "
                "torch 2.13 a compiled checkpointed block that records no graph (a frozen "
                "layer below the lowest active one) fails to compile ('Activation checkpoint "
                "rematerialization ... does not support RNG ops'). Turn it off with "
                "model.gradient_checkpointing_disable() (IST's backward cut already keeps no "
                "activations below the lowest active layer), or leave the blocks uncompiled"
            )
        for name, sub in block.named_modules():
            if sub is not block and (sub._forward_hooks or sub._forward_pre_hooks):
                raise ValueError(
                    f"block {index} has forward hooks on its submodule {name!r} "
                    f"({type(sub).__name__}); they would be traced into the compiled block "
                    "and recompile it per layer. estimator='first-order' with adapters "
                    "registers such hooks: use estimator='normalized' (or 'paper') with "
                    "compile_blocks, or leave the model uncompiled"
                )


def _disable_kv_cache(model: nn.Module) -> None:
    changed = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", False) is True and id(config) not in changed:
            config.use_cache = False
            changed.add(id(config))
    if changed:
        warnings.warn(
            "compile_blocks set model.config.use_cache = False: with a KV cache each layer's "
            "cache index is a compile-time constant, so every layer would compile its own "
            "graph; training needs no cache (set it back for generation)",
            UserWarning,
            stacklevel=3,
        )


def compile_blocks(
    target: nn.Module | torch.optim.Optimizer, **compile_kwargs: Any
) -> list[nn.Module]:
    """Compile the repeated blocks of a model trained with IST, once for all blocks.

    Each block class's ``forward`` is passed to ``torch.compile`` once and bound to every
    block of that class (``block.forward``), so all blocks share one compiled code whose
    variants (adapters frozen or trained, input requiring grad or not, grad mode) are a
    small constant: the compile count does not grow with steps. Hooks stay outside the
    compiled region, so the backward cut keeps working. The rest of the model (embeddings,
    head, loss) stays eager. Calling it again is a no-op for blocks already compiled.

    A KV cache makes each layer's cache index a compile-time constant (one graph per
    layer): ``use_cache`` is set to ``False`` on the model's configs, with a warning.
    Do not also compile the whole model (nor set ``TrainingArguments(torch_compile=True)``).
    To undo, ``del block.forward`` on each returned block.

    Args:
        target: an ``ISTOptimizer`` (its blocks; preferred: build the optimizer first),
            or a model whose blocks are discovered like ``ISTOptimizer`` does.
        **compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``,
            ``fullgraph``, ``options``).

    Returns:
        The compiled blocks, in order.

    Raises:
        TypeError: for a target that is neither a module nor an ``ISTOptimizer``.
        ValueError: for a model already compiled as a whole, a block with its own
            ``forward`` attribute, a block with gradient checkpointing on or switched per
            step by ``memory_budget``, or forward hooks
            on modules inside a block (as ``estimator="first-order"`` registers on LoRA
            adapters).

    Example:
        >>> from ist_optim import ISTOptimizer, compile_blocks
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))
        >>> model = torch.nn.Sequential(*blocks)
        >>> opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, active_layers=1, seed=0,
        ...                    layers=list(blocks), sampling="uniform")
        >>> compiled = compile_blocks(opt, backend="eager")
        >>> len(compiled), is_compiled_block(blocks[0])
        (4, True)
        >>> for _ in range(4):
        ...     model(torch.ones(2, 4)).sum().backward(); opt.step(); opt.zero_grad()
    """
    blocks, model = _blocks_and_model(target)
    _check_blocks(blocks, model)
    _disable_kv_cache(model)
    compiled: dict[type, Callable[..., Any]] = {}
    for block in blocks:
        if is_compiled_block(block):
            continue
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, **compile_kwargs)
        block.forward = types.MethodType(compiled[cls], block)
    return blocks
