"""Integrations with the Hugging Face stack: ``transformers.Trainer`` and ``accelerate``.

Importing this package needs only torch. :class:`ISTCallback` and :func:`add_ist_callback`
subclass / use ``transformers`` and import it when first accessed, so ``import ist_optim``
and ``import ist_optim.integrations`` work without transformers installed.

* :func:`ist_optimizer_cls`: an ``ISTOptimizer`` class bound to a model, for
  ``Trainer(optimizer_cls_and_kwargs=...)``.
* :class:`ISTCallback` / :func:`add_ist_callback`: log IST's active layers, importance and
  optimizer-state bytes through the Trainer's ``on_log`` (so TensorBoard / W&B get them),
  feed importance batches from the eval or train set, write an importance plot.
* :func:`unwrap_ist_optimizer`: the ISTOptimizer inside accelerate's wrapper.
* :func:`keep_4bit_layout`: keep a bitsandbytes 4-bit model's weights in the layout
  training dequantizes from on the CPU (QLoRA; the CLI and the axolotl plugin apply it).
"""

from __future__ import annotations

import importlib
from typing import Any

from .common import unwrap_ist_optimizer
from .optimizer_cls import ist_optimizer_cls
from .quantized import keep_4bit_layout

__all__ = [
    "ISTCallback",
    "add_ist_callback",
    "ist_optimizer_cls",
    "keep_4bit_layout",
    "unwrap_ist_optimizer",
]

_LAZY = {"ISTCallback": ".callback", "add_ist_callback": ".callback"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
