"""The ``"first-order"`` estimator: predicted suppression losses from the training backward.

No extra forward pass. Scaling a layer's adapter output ``y`` by ``lambda`` changes
the loss by about ``(lambda - 1) * <dL/dy, y>``; the inner product comes out of the
training backward pass for every layer the backward reaches (frozen layers above the
lowest trained layer included; layers below it get no estimate that step). For a
peft LoRA adapter ``y = s * B h`` with ``h = A dropout(x)``, and since ``B`` is linear
without bias, ``<dL/dy, y> = <dL/dh, h>``: a tensor hook on ``h`` (the input of
``lora_B``, rank-sized, already kept by autograd when ``B`` trains) gives it with one
small dot product per adapter call. For full fine-tuning (residual mode) a hook on
each block output ``o = x + f(x)`` gives ``<dL/do, o - x>``. Between two rounds, the
per-step values are averaged per layer over the steps that reached it, giving the
predicted suppression loss change ``d_i = (lambda - 1) * mean <dL/dy_i, y_i>``. Each
reached layer is then a singleton candidate set ``{i}`` with "loss" ``d_i`` and the
``"normalized"`` update (:mod:`ist_optim.importance.normalized`; ``K`` = the number of
reached layers). At a minimum of the loss along the adapter's scale the linear term
vanishes, so the estimate is most informative while adapters are still moving
(docs/benchmarks.md measures its agreement with suppression).

Example:
    >>> reached, deltas = predicted_suppression_deltas(
    ...     torch.tensor([4.0, 0.0]), torch.tensor([2, 0]), 0.25)
    >>> reached, deltas.tolist()
    ([0], [-1.5])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from ..config import ISTConfig
from ..core.compile import is_compiled_block
from ..distributed.ranks import average_across_ranks
from ..registry import register_estimator
from ..sampling.sampler import SamplerView
from .normalized import NormalizedUpdate, RunningScale, check_scale_state
from .rounds import ImportanceRound, RoundContext
from .suppression import find_tuner_layers

__all__ = ["FirstOrderProbe", "FirstOrderRound", "predicted_suppression_deltas"]


def predicted_suppression_deltas(
    sums: torch.Tensor, counts: torch.Tensor, factor: float
) -> tuple[list[int], torch.Tensor]:
    """First-order loss change of damping each layer's response by ``factor``.

    Args:
        sums: per-layer sums of ``<dL/dy_i, y_i>`` over the steps since the last round.
        counts: per-layer number of steps that contributed to ``sums`` (averaged over
            ranks, so possibly fractional).
        factor: lambda.

    Returns:
        The layers with at least one contribution, and ``(factor - 1) * sums / counts``
        for them (positive: damping the layer would raise the loss).

    Example:
        >>> predicted_suppression_deltas(torch.tensor([2.0, 0.0, -1.0]),
        ...                              torch.tensor([2, 0, 1]), 0.25)
        ([0, 2], tensor([-0.7500,  0.7500], dtype=torch.float64))
    """
    reached = [i for i in range(counts.numel()) if float(counts[i]) > 0]
    sums = sums.detach().cpu().to(torch.float64)
    return reached, (factor - 1.0) * sums[reached] / counts[reached].to(torch.float64)


def _dot(grad: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if grad.dtype not in (torch.float32, torch.float64):
        grad, value = grad.float(), value.float()
    return torch.dot(grad.reshape(-1), value.reshape(-1))


def _check_plain_lora(module: nn.Module, layer: int) -> None:
    lora_b = getattr(module, "lora_B", None)
    variants = getattr(module, "lora_variant", None) or {}
    ok = isinstance(lora_b, nn.ModuleDict) and len(lora_b) > 0 and not variants
    if ok:
        ok = all(getattr(b, "bias", None) is None for b in lora_b.values())
    if not ok:
        raise ValueError(
            f"estimator='first-order' supports plain peft LoRA adapters (no DoRA or other "
            f"variant, no lora_bias, no embedding LoRA); layer {layer} holds a "
            f"{type(module).__name__} it cannot read. Use estimator='normalized' instead."
        )


class FirstOrderProbe:
    """Accumulates ``<dL/dy_i, y_i>`` per layer from the training backward pass.

    Hooks fire only while grad mode is on and the hooked tensor requires grad, so
    no-grad forwards (evaluation, importance rounds) cost nothing and add nothing.
    Call :meth:`end_step` once per optimizer step and :meth:`take` once per round.

    Args:
        blocks: the block module of each layer.
        mode: ``"adapters"`` (hooks on the input of every peft ``lora_B``) or
            ``"residual"`` (hooks on each block's output), as resolved by
            :class:`ist_optim.Suppressor`.

    Raises:
        ValueError: for an adapter type other than plain LoRA in adapters mode, or blocks
            compiled by :func:`ist_optim.compile_blocks` in adapters mode.

    Example:
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(2))
        >>> probe = FirstOrderProbe(list(blocks), "residual")
        >>> x = torch.ones(1, 3, requires_grad=True)
        >>> blocks[1](blocks[0](x)).sum().backward()
        >>> probe.end_step()
        >>> sums, counts = probe.take()
        >>> counts.tolist()
        [1, 1]
        >>> probe.remove()
    """

    def __init__(self, blocks: Sequence[nn.Module], mode: str):
        if mode not in ("adapters", "residual"):
            raise ValueError(f"mode must be 'adapters' or 'residual', got {mode!r}")
        self.num_layers = len(blocks)
        self.mode = mode
        self._sums: torch.Tensor | None = None  # on the device of the grads
        self._counts = torch.zeros(self.num_layers, dtype=torch.int64)
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._handles: list[Any] = []
        if mode == "residual":
            for layer, block in enumerate(blocks):
                self._handles.append(block.register_forward_hook(
                    partial(self._residual_hook, layer), with_kwargs=True))
            return
        targets = []  # validate every adapter before registering any hook
        for layer, block in enumerate(blocks):
            if is_compiled_block(block):
                raise ValueError(
                    f"layer {layer} was compiled by compile_blocks; estimator='first-order' "
                    "hooks every lora_B inside the blocks, which would be traced into the "
                    "compiled block and recompile it per layer: use estimator='normalized' "
                    "(or 'paper') with compiled blocks"
                )
            for tuner in find_tuner_layers(block):
                _check_plain_lora(tuner, layer)
                targets += [(layer, b) for b in tuner.lora_B.values()]  # type: ignore[union-attr]
        for layer, lora_b in targets:
            self._handles.append(lora_b.register_forward_pre_hook(
                partial(self._adapter_hook, layer)))

    # hooks --------------------------------------------------------------------------
    def _add(self, layer: int, grad: torch.Tensor, value: torch.Tensor,
             base: torch.Tensor | None = None) -> None:
        """Backward hook body: one dot product, kept until :meth:`end_step` folds it in."""
        dot = _dot(grad, value)
        if base is not None:
            dot = dot - _dot(grad, base)
        self._pending.append((layer, dot))

    def _adapter_hook(self, layer: int, _module: nn.Module, args: tuple) -> None:
        hidden = args[0] if args else None
        if not (torch.is_grad_enabled() and isinstance(hidden, torch.Tensor)
                and hidden.requires_grad):
            return
        value = hidden.detach()
        hidden.register_hook(lambda grad: self._add(layer, grad, value))

    def _residual_hook(self, layer: int, _module: nn.Module, args: tuple, kwargs: dict,
                       output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        hidden_in = args[0] if args else kwargs.get("hidden_states")
        out = output[0] if isinstance(output, tuple | list) else output
        if not (isinstance(hidden_in, torch.Tensor) and isinstance(out, torch.Tensor)
                and out.shape == hidden_in.shape):
            raise RuntimeError(
                f"estimator='first-order' in residual mode needs blocks whose first input and "
                f"output are tensors of one shape; layer {layer} ({type(_module).__name__}) "
                "is not. Use estimator='normalized' instead."
            )
        if not out.requires_grad:
            return
        value, base = out.detach(), hidden_in.detach()
        out.register_hook(lambda grad: self._add(layer, grad, value, base))

    # bookkeeping --------------------------------------------------------------------
    def end_step(self) -> None:
        """Add this step's dot products to the sums (one ``index_add_``, no device sync) and
        count one step for every layer the backward reached since the last call."""
        if not self._pending:
            return
        layers = [layer for layer, _ in self._pending]
        values = torch.stack([dot.to(torch.float64) for _, dot in self._pending])
        self._pending = []
        if self._sums is None:
            self._sums = torch.zeros(self.num_layers, dtype=torch.float64, device=values.device)
        self._sums = self._sums.to(values.device)
        self._sums.index_add_(0, torch.tensor(layers, device=values.device), values)
        for layer in set(layers):
            self._counts[layer] += 1

    def discard_step(self) -> None:
        """Drop the dot products since the last :meth:`end_step` (a skipped step's)."""
        self._pending = []

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(sums, counts)`` on CPU since the last :meth:`take`, and reset them."""
        sums = self._current_sums()
        counts = self._counts.clone()
        self._sums = None
        self._counts.zero_()
        return sums, counts

    def _current_sums(self) -> torch.Tensor:
        if self._sums is None:
            return torch.zeros(self.num_layers, dtype=torch.float64)
        return self._sums.detach().cpu().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self._current_sums(), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`. Both tensors come to the host, where :meth:`take`
        returns them: accelerate's ``prepare`` and the Trainer's ``map_location`` may have
        moved them to the accelerator."""
        self._sums = state["sums"].to("cpu", torch.float64).clone()
        self._counts = state["counts"].to("cpu", torch.int64).clone()
        self._pending = []

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@register_estimator
class FirstOrderRound(NormalizedUpdate, ImportanceRound):
    """Predicted suppression deltas from the training backward; no extra forward."""

    name = "first-order"
    min_sets = 2  # one reached layer gives no comparison

    @classmethod
    def build(cls, context: RoundContext) -> ImportanceRound:
        return cls(context.config, context.num_suppressed, context.group, context.blocks,
                   context.suppressor.mode)

    def __init__(self, config: ISTConfig, num_suppressed: int, group: Any,
                 blocks: list[nn.Module], mode: str):
        super().__init__(config, num_suppressed, group)
        self.scale = RunningScale(decay=config.scale_decay)
        self.probe = FirstOrderProbe(blocks, mode)

    def measure(self, sampler: SamplerView) -> tuple[list[list[int]], torch.Tensor]:
        sums, counts = self.probe.take()
        # Sum over the ranks first (every rank, always): the layers reached can differ
        # between ranks (LoRA on MoE experts), and the skip below must agree.
        n = counts.numel()
        totals = average_across_ranks(torch.cat([sums, counts.to(torch.float64)]), self.group)
        sums, counts = totals[:n], totals[n:]
        reached, deltas = predicted_suppression_deltas(sums, counts, self.config.suppression)
        return [[i] for i in reached], deltas

    def end_step(self) -> None:
        self.probe.end_step()

    def discard_step(self) -> None:
        self.probe.discard_step()

    def state_dict(self) -> dict[str, Any]:
        return {**ImportanceRound.state_dict(self), **self.scale_state(),
                "probe": self.probe.state_dict()}

    def check_state(self, state: Mapping[str, Any]) -> None:
        ImportanceRound.check_state(self, state)
        check_scale_state(state)
        probe = state.get("probe")
        n = self.probe.num_layers
        if probe is not None and not (
                isinstance(probe, Mapping)
                and isinstance(probe.get("sums"), torch.Tensor) and probe["sums"].shape == (n,)
                and isinstance(probe.get("counts"), torch.Tensor)
                and probe["counts"].shape == (n,)):
            raise ValueError(f"IST checkpoint entry 'probe' is malformed; expected per-layer "
                             f"'sums' and 'counts' tensors of shape ({n},)")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ImportanceRound.load_state_dict(self, state)
        if state.get("scale") is not None:
            self.scale.load_state_dict(state["scale"])
        if state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])

    def remove(self) -> None:
        self.probe.remove()
