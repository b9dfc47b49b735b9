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
)
from .from_model import planner_for_model
from .shapes import SHAPES, load_config
from .tracker import LiveMemory

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "METHODS",
    "OPTIMIZERS",
    "SHAPES",
    "LiveMemory",
    "MemoryEstimate",
    "MemoryPlanner",
    "StepAccount",
    "account_step",
    "estimate_peak_memory",
    "load_config",
    "planner_for_model",
]
