"""Layer groups: which transformer block every trainable parameter belongs to.

IST's unit is one repeated block ("layer") of a transformer. This module finds the
block list of a model (also through ``peft.PeftModel`` wrapping), and assigns every
parameter the optimizer trains either to one layer or to the *outside* group
(embeddings, heads, ``modules_to_save``), which trains every step.
"""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LayerGroups", "build_layer_groups", "check_layer_indices", "default_params",
           "discover_layers"]

LayersSpec = str | Sequence[nn.Module] | None


def _homogeneous_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ``nn.ModuleList`` of at least two children that all share one class."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                found.append((name, module))
    return found


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _within(name: str, outer: str) -> bool:
    """Whether module ``name`` lies strictly inside module ``outer``."""
    return name != outer and (outer == "" or name.startswith(outer + "."))


def _trained_stacks(candidates: list[tuple[str, nn.ModuleList]],
                    trainable: Sequence[torch.Tensor]) -> list[tuple[str, nn.ModuleList]]:
    """The outermost candidate lists that hold a trainable parameter, in model order."""
    ids = {id(p) for p in trainable}
    holding = [(name, blocks) for name, blocks in candidates
               if any(id(p) in ids for p in blocks.parameters())]
    return [(name, blocks) for name, blocks in holding
            if not any(_within(name, other) for other, _ in holding)]


def discover_layers(model: nn.Module, layers: LayersSpec = None,
                    trainable: Sequence[torch.Tensor] | None = None
                    ) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` for each transformer block of ``model``, in order.

    Args:
        model: any ``nn.Module``; HF models wrapped by ``peft`` work as they are.
        layers: ``None`` to discover the block lists: every outermost homogeneous
            ``nn.ModuleList`` that holds a parameter of ``trainable``, concatenated in
            model order (an encoder-decoder gives its encoder blocks, then its decoder
            blocks; a vision-language model with adapters on the language model only gives
            the language model's blocks); without ``trainable`` (or when no list holds
            one), the list holding the most parameters. Otherwise a sequence of block
            modules; the dotted name of a ``nn.ModuleList`` (``"model.layers"``); or a
            regular expression that fully matches the names of the block modules
            (``r"encoder\\.block\\.\\d+"``).
        trainable: the parameters that will be trained (frozen base weights do not count).

    Raises:
        ValueError: when no block list can be found, naming how to pass ``layers=``.

    Example:
        >>> import torch
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
        >>> net = torch.nn.Sequential(blocks)
        >>> [name for name, _ in discover_layers(net)]
        ['0.0', '0.1', '0.2']
    """
    names = {id(m): n for n, m in model.named_modules()}
    if layers is None:
        candidates = _homogeneous_lists(model)
        if not candidates:
            raise ValueError(
                f"Could not find the repeated block list of {type(model).__name__}: no "
                "nn.ModuleList of at least two modules of one class. Pass the blocks "
                "explicitly, e.g. layers=model.model.layers, layers='model.layers' or a "
                "regex over module names such as layers=r'encoder\\.layer\\.\\d+'."
            )
        stacks = _trained_stacks(candidates, trainable) if trainable is not None else []
        if not stacks:
            stacks = [max(candidates, key=lambda item: _num_params(item[1]))]
        return [(f"{name}.{i}" if name else str(i), block)
                for name, blocks in stacks for i, block in enumerate(blocks)]
    if isinstance(layers, str):
        try:
            sub = model.get_submodule(layers)
        except AttributeError:
            sub = None
        if isinstance(sub, nn.ModuleList):
            return [(f"{layers}.{i}", block) for i, block in enumerate(sub)]
        pattern = re.compile(layers)
        matched = [(n, m) for n, m in model.named_modules() if n and pattern.fullmatch(n)]
        if not matched:
            raise ValueError(
                f"layers={layers!r} names no nn.ModuleList and fully matches no module name "
                f"of {type(model).__name__}; print(model) shows the names to use."
            )
        return matched
    if isinstance(layers, nn.Module) and not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"layers must be a sequence of block modules, a name or a pattern, got a single "
            f"{type(layers).__name__}; wrap it in a list."
        )
    result = []
    for i, block in enumerate(layers):
        if not isinstance(block, nn.Module):
            raise TypeError(f"layers[{i}] is a {type(block).__name__}, expected an nn.Module")
        if id(block) not in names:
            raise ValueError(f"layers[{i}] ({type(block).__name__}) is not a submodule of model")
        result.append((names[id(block)], block))
    if not result:
        raise ValueError("layers is empty; pass at least one block module")
    return result


def check_layer_indices(indices: Any, num_layers: int) -> list[int]:
    """``indices`` as a sorted list of distinct layer indices in ``[0, num_layers)``.

    Raises:
        ValueError: for an empty, repeated, out-of-range or non-int index list.

    Example:
        >>> check_layer_indices([3, 1], 4)
        [1, 3]
    """
    if not isinstance(indices, Iterable) or isinstance(indices, str | bytes):
        raise ValueError(f"layers must be a list of layer indices, got {indices!r}")
    values = list(indices)
    error = ValueError(f"layers must be distinct indices in [0, {num_layers}), got {values}")
    try:  # ints, numpy ints and 0-d integer tensors; not bools, floats or strings
        ints = [operator.index(i) for i in values if not isinstance(i, bool)]
    except TypeError:
        raise error from None
    if (not ints or len(ints) != len(values) or len(set(ints)) != len(ints)
            or not all(0 <= i < num_layers for i in ints)):
        raise error
    return sorted(ints)


@dataclass
class LayerGroups:
    """Trainable parameters split into per-layer groups plus an always-trained outside group.

    Attributes:
        names: module name of each layer, in order (``model.layers.3``).
        modules: the block module of each layer.
        params: the trainable parameters of each layer.
        outside: trainable parameters that belong to no layer; they train every step.
    """

    names: list[str]
    modules: list[nn.Module]
    params: list[list[nn.Parameter]]
    outside: list[nn.Parameter] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.names)

    def numels(self) -> list[int]:
        """Number of trainable elements per layer (a checkpoint signature)."""
        return [sum(p.numel() for p in ps) for ps in self.params]

    def layer_params(self, indices: Iterable[int]) -> list[nn.Parameter]:
        return [p for i in indices for p in self.params[i]]

    def trained_params(self, active: Iterable[int]) -> list[nn.Parameter]:
        """What a step with ``active`` layers trains: their parameters and the outside
        group's."""
        return self.layer_params(active) + self.outside

    def layer_of(self) -> dict[int, int]:
        """``id(parameter) -> layer`` of the trainable parameters of every layer."""
        return {id(p): i for i, params in enumerate(self.params) for p in params}

    def _block_of(self) -> dict[int, int]:
        return {id(p): i for i, m in enumerate(self.modules) for p in m.parameters()}

    def replace_params(self, replacement: Mapping[int, nn.Parameter]) -> None:
        """Swap parameters in place, keeping each one's layer and position:
        ``replacement`` maps ``id(old parameter)`` to the parameter that replaces it (e.g.
        its FSDP2 shard); parameters it does not name stay."""
        for params in (*self.params, self.outside):
            params[:] = [replacement.get(id(p), p) for p in params]

    def add_params(self, params: Iterable[nn.Parameter]) -> list[int | None]:
        """Register new trainable parameters (a param group added after construction)
        with the layer whose block owns them, or with the outside group.

        Returns:
            The layer of each parameter, ``None`` for the outside group.
        """
        index = self._block_of()
        layers: list[int | None] = []
        for p in params:
            layer = index.get(id(p))
            (self.outside if layer is None else self.params[layer]).append(p)
            layers.append(layer)
        return layers


def _prompt_learning_hint(model: nn.Module) -> str:
    """A sentence naming the peft prompt-learning method of ``model``, if it uses one."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return ""
    kinds = sorted({str(getattr(c.peft_type, "value", c.peft_type)) for c in configs.values()
                    if getattr(c, "is_prompt_learning", False)})
    if not kinds:
        return ""
    return (f"The peft method {', '.join(kinds)} trains virtual tokens outside the blocks, so "
            "it has no per-layer parameters to sample: it is not supported by IST. ")


OUTSIDE_SHARE_WARNING = 0.5
"""Warn when the outside group holds more than this share of the trainable elements."""


def _warn_large_outside(model: nn.Module, trainable: Sequence[torch.Tensor],
                        outside: Sequence[torch.Tensor]) -> None:
    total = sum(p.numel() for p in trainable)
    share = sum(p.numel() for p in outside) / total if total else 0.0
    if share <= OUTSIDE_SHARE_WARNING:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    largest = sorted(outside, key=lambda p: -p.numel())[:3]
    shown = ", ".join(names.get(id(p), f"<{tuple(p.shape)}>") for p in largest)
    warnings.warn(
        f"{share:.0%} of the trainable elements belong to no discovered layer (largest: "
        f"{shown}) and train every step; IST samples only the rest. If these are blocks, "
        "pass layers= (a list of modules, a ModuleList name or a regex)",
        UserWarning,
        stacklevel=4,
    )


def build_layer_groups(
    model: nn.Module, trainable: Sequence[torch.Tensor], layers: LayersSpec = None
) -> LayerGroups:
    """Assign each trainable parameter to the block that owns it, or to the outside group.

    Blocks that own no trainable parameter are left out (e.g. LoRA with
    ``layers_to_transform``), so every layer in the result can be trained. When the
    blocks were discovered and the outside group holds more than half of the trainable
    elements, a warning names the largest outside parameters (IST then samples a minor
    part of what trains).

    Raises:
        ValueError: when no block holds a trainable parameter.
    """
    blocks = discover_layers(model, layers, trainable)
    owner: dict[int, int] = {}
    for index, (name, block) in enumerate(blocks):
        for p in block.parameters():
            if id(p) in owner and owner[id(p)] != index:
                raise ValueError(
                    f"parameter of shape {tuple(p.shape)} is shared between layers "
                    f"{blocks[owner[id(p)]][0]} and {name}; IST needs each parameter in one layer"
                )
            owner[id(p)] = index
    per_layer: list[list[nn.Parameter]] = [[] for _ in blocks]
    outside: list[nn.Parameter] = []
    for p in trainable:
        if id(p) in owner:
            per_layer[owner[id(p)]].append(p)
        else:
            outside.append(p)
    kept = [i for i, ps in enumerate(per_layer) if ps]
    if not kept:
        raise ValueError(
            f"none of the {len(blocks)} blocks found ({blocks[0][0]}, ...) holds a trainable "
            "parameter; IST samples layers among the blocks, so at least one must train. "
            f"{_prompt_learning_hint(model)}"
            "Check requires_grad / your adapter config, or pass layers= explicitly."
        )
    if layers is None:
        _warn_large_outside(model, trainable, outside)
    return LayerGroups(
        names=[blocks[i][0] for i in kept],
        modules=[blocks[i][1] for i in kept],
        params=[per_layer[i] for i in kept],
        outside=outside,
    )


def default_params(model: nn.Module, params: Iterable[Any] | None) -> Iterable[Any]:
    """``params`` as given, or every parameter of ``model`` that requires grad.

    Raises:
        ValueError: for an empty ``params``, or a model with nothing to train.
    """
    if params is not None:
        if isinstance(params, Sized) and len(params) == 0:
            raise ValueError("params is empty; pass at least one parameter to train, or "
                             "leave params=None to train every parameter that requires grad")
        return params
    chosen = [p for p in model.parameters() if p.requires_grad]
    if not chosen:
        raise ValueError(
            f"{type(model).__name__} has no parameter with requires_grad=True; add "
            "adapters (peft) or unfreeze the weights to train, or pass params="
        )
    return chosen
