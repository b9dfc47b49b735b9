"""Response suppression: damp the contribution of chosen layers, then restore it exactly.

Two mechanisms, chosen per model:

* ``"adapters"`` (any model with peft tuner layers inside its blocks): tuner layers are
  found by type (``peft``'s ``BaseTunerLayer``), never by a duck-typed ``scaling``
  attribute (HF attention modules have one too). LoRA, DoRA, rsLoRA, AdaLoRA, LoHa and
  LoKr scale their per-adapter ``scaling[name]`` by ``lambda``; for DoRA that damps the
  low-rank direction before the magnitude re-normalisation, as the official code does.
  (IA)^3 moves its scaling vector ``l`` toward the identity: ``1 + lambda * (l - 1)``,
  which scales the adapter's change of the output by exactly ``lambda``.
* ``"residual"`` (full fine-tuning, no adapters): each block's residual branch is
  damped, ``x + lambda * (block(x) - x)``, through forward hooks.

Every original value is saved per module and per adapter and put back in ``finally``,
so the model is bit-identical afterwards, also when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["Suppressor", "find_tuner_layers"]

SuppressionMode = Literal["auto", "adapters", "residual"]


def _peft_types() -> dict[str, type] | None:
    try:
        from peft.tuners.ia3 import IA3Layer
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lycoris_utils import LycorisLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return {"base": BaseTunerLayer, "lora": LoraLayer, "lycoris": LycorisLayer, "ia3": IA3Layer}


def find_tuner_layers(block: nn.Module) -> list[nn.Module]:
    """The peft tuner layers (``BaseTunerLayer`` instances) inside ``block``."""
    types = _peft_types()
    if types is None:
        return []
    return [m for m in block.modules() if isinstance(m, types["base"])]


def _active_adapters(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None) or []
    return [active] if isinstance(active, str) else list(active)


@contextmanager
def _scale_scaling(module: nn.Module, factor: float) -> Iterator[None]:
    """LoRA-family and LyCORIS layers: ``scaling[name] *= factor`` for active adapters."""
    scaling: dict[str, Any] = module.scaling  # type: ignore[assignment]
    saved = {n: scaling[n] for n in _active_adapters(module) if n in scaling}
    try:
        for name, value in saved.items():
            scaling[name] = value * factor
        yield
    finally:
        for name, value in saved.items():
            scaling[name] = value


@contextmanager
def _damp_ia3(module: nn.Module, factor: float) -> Iterator[None]:
    """(IA)^3: ``l <- 1 + factor * (l - 1)`` in place, restored from a copy."""
    vectors = module.ia3_l  # type: ignore[attr-defined]
    saved = {n: vectors[n].detach().clone() for n in _active_adapters(module) if n in vectors}
    try:
        with torch.no_grad():
            for name, original in saved.items():
                vectors[name].copy_(1.0 + factor * (original - 1.0))
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                vectors[name].copy_(original)


@contextmanager
def _damp_residual(block: nn.Module, factor: float) -> Iterator[None]:
    """``out = x + factor * (block(x) - x)`` on the block's first input and output."""
    inputs: list[torch.Tensor] = []

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise RuntimeError(
                f"cannot damp the residual branch of {type(block).__name__}: its first input "
                "is not a tensor; pass suppression_mode='adapters' with peft adapters instead"
            )
        inputs.append(hidden)

    def hook(_mod: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        hidden_in = inputs.pop()
        first = output[0] if isinstance(output, tuple | list) else output
        if not isinstance(first, torch.Tensor) or first.shape != hidden_in.shape:
            raise RuntimeError(
                f"cannot damp the residual branch of {type(block).__name__}: its output is not "
                "a tensor of its input's shape"
            )
        damped = hidden_in + factor * (first - hidden_in)
        if isinstance(output, tuple | list):
            return type(output)([damped, *output[1:]])
        return damped

    handles = [
        block.register_forward_pre_hook(pre_hook, with_kwargs=True),
        block.register_forward_hook(hook, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Suppressor:
    """Damps the response of chosen layers by ``factor`` inside a context.

    Args:
        blocks: the block module of each layer.
        factor: lambda, the factor on the suppressed response (the paper's 0.25).
        mode: ``"auto"`` (adapters when any block holds peft tuner layers, else
            residual), ``"adapters"`` or ``"residual"``.

    Raises:
        ValueError: for a tuner type that has no suppression rule, naming the type,
            or ``mode="adapters"`` on a model without adapters.

    Example:
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(2))
        >>> sup = Suppressor(list(blocks), factor=0.25)
        >>> x = torch.ones(1, 3)
        >>> with sup.suppress([0]):
        ...     damped = blocks[0](x)
        >>> torch.allclose(damped, x + 0.25 * (blocks[0](x) - x))
        True
    """

    def __init__(self, blocks: Sequence[nn.Module], factor: float, mode: SuppressionMode = "auto"):
        if mode not in ("auto", "adapters", "residual"):
            raise ValueError(f"suppression mode {mode!r} is not 'auto', 'adapters' or 'residual'")
        self.blocks = list(blocks)
        self.factor = float(factor)
        tuners = [find_tuner_layers(block) for block in self.blocks]
        has_adapters = any(tuners)
        if mode == "adapters" and not has_adapters:
            raise ValueError("suppression mode 'adapters' needs peft tuner layers in the blocks")
        self.mode: str = "adapters" if (mode == "auto" and has_adapters) else mode
        if self.mode == "auto":
            self.mode = "residual"
        self._tuners = tuners
        if self.mode == "adapters":
            for layer_tuners in tuners:
                for module in layer_tuners:
                    self._rule(module)  # validate every tuner type now, not at step T

    def _rule(self, module: nn.Module):  # noqa: ANN202
        types = _peft_types()
        assert types is not None  # tuner layers were found, so peft imports
        if isinstance(module, types["ia3"]):
            return _damp_ia3
        if isinstance(module, types["lora"] | types["lycoris"]) and isinstance(
            getattr(module, "scaling", None), dict
        ):
            return _scale_scaling
        raise ValueError(
            f"IST has no suppression rule for the peft adapter type {type(module).__name__}; "
            "supported: LoRA, DoRA, rsLoRA, AdaLoRA, LoHa, LoKr and (IA)^3. Use "
            "sampling='uniform' (no importance rounds) to train it with layer sampling."
        )

    @contextmanager
    def suppress(self, layer_indices: Sequence[int]) -> Iterator[None]:
        """Damp the layers in ``layer_indices`` for the duration of the context."""
        with ExitStack() as stack:
            for index in layer_indices:
                if self.mode == "residual":
                    stack.enter_context(_damp_residual(self.blocks[index], self.factor))
                else:
                    for module in self._tuners[index]:
                        stack.enter_context(self._rule(module)(module, self.factor))
            yield
