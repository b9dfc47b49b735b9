"""The offline memory planner: a training step's memory measured on a real run, or
predicted for any model shape (the runtime that trains inside a budget is
:mod:`ist_optim.memory`).

* :func:`account_step` runs one step and splits its peak into weights, gradients, optimizer
  state, saved activations and transient buffers (:class:`StepAccount`).
* :func:`estimate_peak_memory` predicts that peak from a transformers config alone
  (:class:`MemoryEstimate`); :class:`MemoryPlanner` measures a model shape once and then
  answers "what peak for this active set, with checkpointing on these blocks" in
  microseconds; LoRA, QLoRA (4-bit base, :mod:`.quantized`) and full fine-tuning with
  AdamW, 8-bit AdamW, GaLore or APOLLO (:mod:`.projection`).
* :meth:`MemoryPlanner.step_time` and :func:`estimate_step_time` predict the step's time on
  a :class:`Device` from the operators it runs (:mod:`.roofline`, :mod:`.steptime`).
* :func:`planner_for_model` builds the planner of a transformers model from its config,
  its adapters and the optimizer's blocks (:class:`~ist_optim.LayerGroups`).

See docs/memory.md, "Planning memory".
"""

from .accounting import StepAccount, account_step
from .estimate import (
    DEFAULT_LORA_TARGETS,
    METHODS,
    OPTIMIZERS,
    MemoryEstimate,
    MemoryPlanner,
    estimate_peak_memory,
    estimate_step_time,
)
from .from_model import planner_for_model
from .roofline import DEVICES, Device, OpCost, OpCounter
from .shapes import SHAPES, load_config
from .steptime import StepTime
from .tracker import LiveMemory

__all__ = [
    "DEVICES",
    "DEFAULT_LORA_TARGETS",
    "Device",
    "METHODS",
    "OPTIMIZERS",
    "SHAPES",
    "LiveMemory",
    "MemoryEstimate",
    "MemoryPlanner",
    "OpCost",
    "OpCounter",
    "StepAccount",
    "StepTime",
    "account_step",
    "estimate_peak_memory",
    "estimate_step_time",
    "load_config",
    "planner_for_model",
]
