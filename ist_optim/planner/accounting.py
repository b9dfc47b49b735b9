"""Where the memory of one real training step goes: ``account_step``.

Runs one training step under :class:`~ist_optim.planner.tracker.LiveMemory` and labels every
storage alive at the step's peak: parameters and buffers (``weights``, with the quantization
constants of bitsandbytes 4-bit weights), ``.grad`` tensors (``gradients``, labelled by
post-accumulate-grad hooks), optimizer state (``optimizer_state``, labelled after each
optimizer step by a global step hook, so wrapped inner optimizers such as
``ISTOptimizer.optimizer`` count too, and tensors that state objects hold, such as GaLore's
projection matrices), tensors autograd saved for backward (``activations``, labelled by
:func:`torch.autograd.graph.saved_tensors_hooks`) and everything else (``transient``:
logits, gradient buffers, temporaries). On CPU this is the only exact figure (RSS counts
allocator caches and the Python heap); on CUDA it agrees with
``torch.cuda.max_memory_allocated`` up to allocations made outside torch's operators
(cuBLAS workspaces), which it also reports for comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .tracker import LiveMemory

__all__ = ["StepAccount", "account_step"]

_PARTS = ("weights", "gradients", "optimizer_state", "activations", "transient")


@dataclass(frozen=True)
class StepAccount:
    """The measured peak of one training step on one device.

    Attributes:
        peak_bytes: the most bytes of tensor storage alive on ``device`` during the step.
        breakdown: those bytes by kind (``weights``, ``gradients``, ``optimizer_state``,
            ``activations``, ``transient``); they sum to ``peak_bytes``.
        host_optimizer_state_bytes: optimizer state held off ``device`` at the end of the
            step (tensors on another device, plus what ``memory_report()`` reports as
            offloaded for an ``ISTOptimizer``).
        device: the device accounted.
        allocator_peak_bytes: ``torch.cuda.max_memory_allocated`` over the step on CUDA,
            else None.
    """

    peak_bytes: int
    breakdown: dict[str, int]
    host_optimizer_state_bytes: int
    device: str
    allocator_peak_bytes: int | None = None


def _tensors_in(value: Any, depth: int = 2) -> list[torch.Tensor]:
    """Tensors held by a state entry: the tensor itself, or those an object keeps in its
    attributes (GaLore's and APOLLO's projectors keep their projection matrix there)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0 or isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item, depth - 1)]
    fields = getattr(value, "__dict__", None)
    if isinstance(fields, dict):
        return [t for item in fields.values() for t in _tensors_in(item, depth - 1)]
    return []


def _state_tensors(optimizer: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for per_param in getattr(optimizer, "state", {}).values():
        if isinstance(per_param, dict):
            out += [t for v in per_param.values() for t in _tensors_in(v)]
    return out


def _quantization_tensors(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The quantization constants of bitsandbytes 4-bit weights (``Params4bit.quant_state``:
    absmax, code, and with double quantization the nested absmax, code and offset): weights
    too, though neither parameters nor buffers."""
    out: list[torch.Tensor] = []
    for p in params:
        state = getattr(p, "quant_state", None)
        while state is not None:
            out += [t for t in (getattr(state, "absmax", None), getattr(state, "code", None),
                                getattr(state, "offset", None)) if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None) if getattr(state, "nested", False) else None
    return out


def account_step(step: Callable[[], Any], *, model: nn.Module,
                 optimizer: torch.optim.Optimizer | Any,
                 device: str | torch.device | None = None) -> StepAccount:
    """Run ``step()`` once and account the peak memory on ``device``.

    Args:
        step: runs one training step (forward, backward, ``optimizer.step()``, and
            ``zero_grad`` if the loop does), e.g. ``lambda: train_step(batch)``. Run a
            step before accounting to see the steady state (optimizer state exists).
        model: the model trained (its parameters and buffers are ``weights``).
        optimizer: the optimizer stepped (any ``torch.optim.Optimizer``, an
            ``ISTOptimizer``, a bitsandbytes optimizer).
        device: the device to account (default: the device of the model's first
            parameter).

    Example:
        >>> model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> x = torch.ones(16, 32)
        >>> def train_step():
        ...     model(x).sum().backward()
        ...     opt.step()
        ...     opt.zero_grad(set_to_none=True)
        >>> train_step()
        >>> account = account_step(train_step, model=model, optimizer=opt)
        >>> account.breakdown["weights"] == sum(p.numel() * 4 for p in model.parameters())
        True
        >>> weights = account.breakdown["weights"]  # AdamW: two moments + a 4-byte step each
        >>> account.breakdown["optimizer_state"] == 2 * weights + 4 * len(opt.state)
        True
        >>> account.peak_bytes == sum(account.breakdown.values())
        True
    """
    if not callable(step):
        raise TypeError(f"step must be a callable that runs one training step, got {step!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if device is None:
        if not params:
            raise ValueError("model has no parameters; pass device= explicitly")
        device = params[0].device
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    live = LiveMemory(device)
    for tensor in [*params, *model.buffers(), *_quantization_tensors(params)]:
        live.label(tensor, "weights")
    for p in params:
        if p.grad is not None:
            live.label(p.grad, "gradients")
    for tensor in _state_tensors(optimizer):
        live.label(tensor, "optimizer_state")
    live.reset_peak()

    def label_grad(param: torch.Tensor) -> None:
        if param.grad is not None:
            live.label(param.grad, "gradients")

    def label_state(opt: Any, args: Any, kwargs: Any) -> None:
        for tensor in _state_tensors(opt):
            live.label(tensor, "optimizer_state")

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        serial = live.add(tensor)
        if serial is not None and live.label_of(tensor) is None:
            live.label(tensor, "activations")
        return tensor

    handles = [p.register_post_accumulate_grad_hook(label_grad)
               for p in params if p.requires_grad]
    handles.append(register_optimizer_step_post_hook(label_state))
    try:
        with live, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        for handle in handles:
            handle.remove()
    found = live.peak_breakdown(default="transient")
    breakdown = {part: found.get(part, 0) for part in _PARTS}
    host = sum(t.numel() * t.element_size() for t in _state_tensors(optimizer)
               if t.device != device)
    report = getattr(optimizer, "memory_report", None)
    if callable(report):
        host += int(report().get("state_bytes_offloaded", 0))
    return StepAccount(peak_bytes=live.peak_bytes, breakdown=breakdown,
                       host_optimizer_state_bytes=host, device=str(device),
                       allocator_peak_bytes=int(torch.cuda.max_memory_allocated(device))
                       if cuda else None)
