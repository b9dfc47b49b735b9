"""bitsandbytes 4-bit models on the CPU: keep the layout training dequantizes from."""

from __future__ import annotations

from typing import Any

__all__ = ["keep_4bit_layout"]


def keep_4bit_layout(model: Any) -> int:
    """Stop bitsandbytes from repacking ``model``'s 4-bit weights for its CPU kernel.

    bitsandbytes 0.50 (``Linear4bit.forward``) converts a 4-bit weight to a CPU-specific
    layout the first time the layer runs in eval mode without grad on a CPU with
    AVX512-BF16 (IST's importance rounds and every evaluation do), rounding its scales
    (``absmax``) to bfloat16; ``state_dict()`` converts it back, but without double
    quantization the scales stay in the transposed bfloat16 layout, so every later
    training forward dequantizes with misplaced scales, and with double quantization the
    scales are quantized again (docs/peft-methods.md, "QLoRA"). Setting each layer's
    ``support_avx512bf16_for_cpu`` to False keeps the training layout: every forward
    dequantizes the same weights and ``state_dict()`` changes nothing (eval forwards run the
    generic dequantize-and-matmul path). Does nothing on layers of other kinds.

    Returns:
        The number of 4-bit layers changed.

    Example:
        >>> import torch
        >>> keep_4bit_layout(torch.nn.Linear(2, 2))  # no 4-bit layer: nothing to change
        0
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and \
                type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
