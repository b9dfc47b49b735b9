"""The predicted time of one training step, the companion of the predicted peak.

:meth:`ist_optim.MemoryPlanner.step_time` prices a :class:`~ist_optim.MemoryEstimate`: the
pieces its step runs (every block's forward, the head's forward and backward, the backward
of each block down to the lowest one backward reaches, the forward again of each
checkpointed block among them: :attr:`~ist_optim.MemoryEstimate.runs`), each as the
operators the planner recorded when it ran the piece on the ``meta`` device, on a
:class:`~ist_optim.planner.roofline.Device` (:func:`~ist_optim.planner.roofline.seconds`),
plus the optimizer step: torch's AdamW run once on a ``meta`` parameter in the trained
dtype (and ``foreach`` setting) gives the bytes its update moves per parameter, which the
step moves for every parameter it updates (:func:`optimizer_bytes_per_param`; 8-bit, GaLore
and APOLLO states are priced as AdamW's, an approximation). A 4-bit base (QLoRA) adds the
unpacking of each block's weights in its forward and its backward.

The absolute seconds leave out what a roofline cannot see (kernel launches, the Python
loop, a CPU's caches); ratios between set-ups on one device are what the model is checked
on (docs/benchmarks.md, "Predicted step time").

Example:
    >>> from transformers import LlamaConfig
    >>> from ist_optim import MemoryPlanner
    >>> config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    ...                      num_attention_heads=4, vocab_size=256)
    >>> planner = MemoryPlanner(config, batch_size=2, seq_len=16, dtype=torch.float32)
    >>> plain = planner.step_time(planner.estimate(), "h100")
    >>> checkpointed = planner.step_time(planner.estimate(gradient_checkpointing=True), "h100")
    >>> checkpointed.seconds > plain.seconds, checkpointed.parts["recompute"] > 0
    (True, True)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .blocks import ModelCosts
from .roofline import DEVICES, Device, OpCost, OpCounter, seconds

__all__ = ["StepTime", "device_of", "optimizer_bytes_per_param", "price_step"]

#: Parameters of the ``meta`` AdamW run that measures the update's traffic.
_PROBE_NUMEL = 2**20
#: The parts of a step's time.
PARTS = ("forward", "loss", "backward", "recompute", "optimizer")


@dataclass(frozen=True)
class StepTime:
    """The predicted time of one step on one device.

    Attributes:
        seconds: the sum of ``parts``.
        parts: seconds by part: ``forward`` (the embedding and every block's forward),
            ``loss`` (the head's forward and backward), ``backward`` (the blocks'),
            ``recompute`` (checkpointed blocks' forward again), ``optimizer`` (the update).
        device: the :class:`~ist_optim.planner.roofline.Device` it was priced on.
    """

    seconds: float
    parts: dict[str, float] = field(default_factory=dict)
    device: Device | None = None


def device_of(device: Device | str) -> Device:
    """A :class:`Device`, or the one :data:`~ist_optim.planner.roofline.DEVICES` names.

    Example:
        >>> device_of("h200").bytes_per_second
        4800000000000.0
    """
    if isinstance(device, Device):
        return device
    if device not in DEVICES:
        raise ValueError(f"Invalid device: {device!r}; expected one of {sorted(DEVICES)} or "
                         f"a Device (Device.measure() for this machine's CPU)")
    return DEVICES[device]


@functools.cache
def optimizer_bytes_per_param(dtype: torch.dtype, foreach: bool) -> float:
    """Bytes torch's AdamW reads and writes per parameter in one steady-state update of
    ``dtype`` parameters (its state already made), counted on the ``meta`` device.

    Example:
        >>> round(optimizer_bytes_per_param(torch.float32, False), 1)   # 21 accesses of 4 B
        84.0
    """
    param = torch.nn.Parameter(torch.empty(_PROBE_NUMEL, device="meta", dtype=dtype))
    param.grad = torch.empty_like(param)
    optimizer = torch.optim.AdamW([param], lr=1e-3, foreach=foreach)
    optimizer.step()  # makes the state
    with OpCounter() as counter:
        optimizer.step()
    return sum(op.bytes for op in counter.ops) / _PROBE_NUMEL


def price_step(costs: ModelCosts, runs: dict[tuple[str, tuple[bool, bool], str], int],
               *, trained_params: int, update_bytes_per_param: float,
               device: Device | str, embedding_grad: bool = False,
               dequantize: OpCost | None = None) -> StepTime:
    """Seconds of a step that runs ``runs`` (a :class:`~ist_optim.MemoryEstimate`'s) and
    updates ``trained_params`` parameters, each update moving ``update_bytes_per_param``.
    ``dequantize``: a 4-bit base's block weights unpacked to the compute dtype (read packed,
    written whole), once in every forward of a block and once in its backward (the planner's
    ``meta`` layers allocate those buffers without an operator that moves them)."""
    device = device_of(device)
    parts = dict.fromkeys(PARTS, 0.0)
    embedding = [OpCost(0, 2 * costs.hidden_bytes)]  # the gather writes the hidden states
    if embedding_grad:  # a zeroed table, then the rows added into it
        embedding += [OpCost(0, costs.embed_bytes), OpCost(0, costs.embed_bytes
                                                           + 2 * costs.hidden_bytes)]
    parts["forward"] += seconds(embedding, device)
    for (piece, mode, how), count in runs.items():
        cost = costs.blocks[mode] if piece == "block" else costs.heads[mode]
        ops = cost.backward_ops if how == "backward" else cost.forward_ops
        part = "loss" if piece == "head" else how
        parts[part] += count * seconds(ops, device)
        if dequantize is not None and piece == "block":
            parts[part] += count * device.op_seconds(dequantize)
    parts["optimizer"] = trained_params * update_bytes_per_param / device.bytes_per_second
    return StepTime(sum(parts.values()), parts, device)
