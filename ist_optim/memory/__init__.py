"""Memory of a training step: measured on a real run, or predicted for any model shape.

* :class:`PeakMemory` measures the device's peak over a stretch of work (the CUDA
  allocator's, or the process's resident set on the CPU).
* :func:`account_step` runs one step and splits its peak into weights, gradients, optimizer
  state, saved activations and transient buffers (:class:`StepAccount`).
* :func:`estimate_peak_memory` predicts that peak from a transformers config alone
  (:class:`MemoryEstimate`); :class:`MemoryPlanner` measures a model shape once and then
  answers "what peak for this active set, with checkpointing on these blocks" in
  microseconds; LoRA, QLoRA (4-bit base, :mod:`.quantized`) and full fine-tuning with
  AdamW, 8-bit AdamW, GaLore or APOLLO (:mod:`.projection`).

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
from .shapes import SHAPES, load_config
from .tracker import LiveMemory, PeakMemory

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "METHODS",
    "OPTIMIZERS",
    "SHAPES",
    "LiveMemory",
    "MemoryEstimate",
    "MemoryPlanner",
    "PeakMemory",
    "StepAccount",
    "account_step",
    "estimate_peak_memory",
    "load_config",
]
