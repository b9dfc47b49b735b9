"""Response suppression: damp the contribution of chosen layers, then restore it exactly.

Two mechanisms, chosen per model:

* ``"adapters"`` (any model with peft tuner layers inside its blocks): tuner layers are
  found by type (``peft``'s ``BaseTunerLayer``), never by a duck-typed ``scaling``
  attribute (HF attention modules have one too). Every rule scales the adapter's change
  of its module's output by exactly ``lambda``: ``base(x) + lambda * (adapted(x) - base(x))``,
  so ``lambda = 0`` equals disabling the adapter and ``lambda = 1`` changes nothing.
  LoRA, rsLoRA, AdaLoRA, LoHa and LoKr are linear in their per-adapter ``scaling[name]``,
  which is multiplied by ``lambda``. DoRA is not (its magnitude re-normalisation), so the
  output of its magnitude module, which is exactly DoRA's change of the output, is
  multiplied by ``lambda`` through a forward hook. (IA)^3 moves its vector ``l`` toward
  the identity: ``1 + lambda * (l - 1)``. Other LoRA variants and other tuner types
  (VeRA, OFT, BOFT, ...) raise a ``ValueError`` naming them.
* ``"residual"`` (full fine-tuning, no adapters): each block's residual branch is
  damped, ``x + lambda * (block(x) - x)``, through forward hooks.

Every original value is saved per module and per adapter and put back in ``finally``,
so the model is bit-identical afterwards, also when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from ..config import SuppressionMode

__all__ = ["Suppressor", "find_tuner_layers"]



def _peft_types() -> dict[str, type] | None:
    try:
        from peft.tuners.ia3 import IA3Layer
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.dora import DoraEmbeddingLayer, DoraLinearLayer
        from peft.tuners.lycoris_utils import LycorisLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    return {"base": BaseTunerLayer, "lora": LoraLayer, "lycoris": LycorisLayer, "ia3": IA3Layer,
            "dora": DoraLinearLayer, "dora_embedding": DoraEmbeddingLayer}


def _adapter_kind(module: nn.Module) -> str:
    """``'vera (peft.tuners.vera.layer.Linear)'``: the peft tuner package and the class."""
    cls = type(module)
    parts = cls.__module__.split(".")
    tuner = parts[2] if len(parts) > 2 and parts[:2] == ["peft", "tuners"] else "unknown"
    return f"{tuner!r} ({cls.__module__}.{cls.__qualname__})"


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
def _scale_scaling(
    module: nn.Module, factor: float, names: Sequence[str] | None = None
) -> Iterator[None]:
    """LoRA-family and LyCORIS layers: ``scaling[name] *= factor`` for active adapters
    (or for ``names``)."""
    scaling: dict[str, Any] = module.scaling  # type: ignore[assignment]
    names = _active_adapters(module) if names is None else names
    saved = {n: scaling[n] for n in names if n in scaling}
    try:
        for name, value in saved.items():
            scaling[name] = value * factor
        yield
    finally:
        for name, value in saved.items():
            scaling[name] = value


@contextmanager
def _damp_lora(module: nn.Module, factor: float) -> Iterator[None]:
    """LoRA layers: ``scaling[name] *= factor`` for plain adapters; for DoRA adapters the
    output of the magnitude module (DoRA's whole change of the output) times ``factor``."""
    magnitudes = getattr(module, "lora_magnitude_vector", {})
    active = _active_adapters(module)
    dora = [n for n in active if n in magnitudes]

    def hook(_mod: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * factor

    handles = [magnitudes[name].register_forward_hook(hook) for name in dora]
    try:
        with _scale_scaling(module, factor, [n for n in active if n not in magnitudes]):
            yield
    finally:
        for handle in handles:
            handle.remove()


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


_SUPPORTED = (
    "supported: LoRA, rsLoRA, DoRA (linear and conv layers), AdaLoRA, LoHa, LoKr and (IA)^3. "
    "Use sampling='uniform' (no importance rounds) to train it with layer sampling."
)


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
        has_scaling = isinstance(getattr(module, "scaling", None), dict)
        if isinstance(module, types["lora"]) and has_scaling:
            self._check_lora_variants(module, types)
            return _damp_lora
        if isinstance(module, types["lycoris"]) and has_scaling:
            return _scale_scaling
        raise ValueError(
            f"IST has no suppression rule for the peft adapter type {_adapter_kind(module)}; "
            f"{_SUPPORTED}"
        )

    @staticmethod
    def _check_lora_variants(module: nn.Module, types: dict[str, type]) -> None:
        """Plain LoRA / rsLoRA / AdaLoRA and DoRA on linear or conv layers pass."""
        variants = getattr(module, "lora_variant", {}) or {}
        magnitudes = getattr(module, "lora_magnitude_vector", {})
        for name in _active_adapters(module):
            variant = variants.get(name)
            magnitude = magnitudes[name] if name in magnitudes else None
            is_dora = isinstance(magnitude, types["dora"]) and not isinstance(
                magnitude, types["dora_embedding"])
            if (variant is None and magnitude is None) or is_dora:
                continue
            what = type(variant).__name__ if variant is not None else type(magnitude).__name__
            raise ValueError(
                f"IST has no suppression rule for the LoRA variant {what} of adapter {name!r} "
                f"in {_adapter_kind(module)}; {_SUPPORTED}"
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
