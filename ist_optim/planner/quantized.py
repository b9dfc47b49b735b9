"""4-bit base weights (QLoRA) for the planner: bitsandbytes' storage and dequantization.

A QLoRA model stores every linear layer of its decoder blocks in 4 bits (bitsandbytes
``Linear4bit``, NF4 or FP4): two weights a byte, one scale (``absmax``) per block of 64
weights, and a 16-entry code. Double quantization (``bnb_4bit_use_double_quant=True``)
stores the scales in 8 bits with a second-level fp32 scale per 256 of them, a 256-entry code
and an offset. :func:`quantized_weight_bytes` counts exactly what bitsandbytes 0.50 keeps
(``Params4bit`` plus its ``quant_state``).

Each matmul dequantizes the whole weight to the compute dtype first: in the forward
(``bitsandbytes::gemm_4bit``; on CUDA past 1,536 rows of input, the dequantize-then-
``F.linear`` path, which batch x sequence always exceeds in training) and again in the
backward for the input gradient (``MatMul4Bit.backward``). Nothing of the weight is saved
for backward. :class:`MetaLinear4bit` reproduces those allocations on the ``meta`` device,
so :func:`~ist_optim.planner.blocks.measure_model` measures a QLoRA block as it measures
any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantSpec", "MetaLinear4bit", "quantize_block_linears", "quantized_weight_bytes"]

_CODE_ENTRIES = 16  # the NF4 / FP4 code, float32
_NESTED_CODE_ENTRIES = 256  # the 8-bit dynamic code of the nested scales, float32
_NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class QuantSpec:
    """How the block linears are quantized (bitsandbytes ``BitsAndBytesConfig`` fields).

    Attributes:
        double_quant: ``bnb_4bit_use_double_quant`` (8-bit scales).
        blocksize: weights per scale (bitsandbytes' default 64).
    """

    double_quant: bool = False
    blocksize: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) \
                or self.blocksize < 2:
            raise ValueError(f"blocksize must be an integer >= 2, got {self.blocksize!r}")


def _scale_blocks(numel: int, spec: QuantSpec) -> int:
    return math.ceil(numel / spec.blocksize)


def quantized_weight_bytes(numel: int, spec: QuantSpec) -> int:
    """Bytes bitsandbytes keeps for one 4-bit weight of ``numel`` elements.

    Example:
        >>> quantized_weight_bytes(128 * 128, QuantSpec())  # 8192 packed + 256 fp32 scales + code
        9280
        >>> quantized_weight_bytes(128 * 128, QuantSpec(double_quant=True))
        9544
    """
    blocks = _scale_blocks(numel, spec)
    total = math.ceil(numel / 2) + 4 * _CODE_ENTRIES
    if spec.double_quant:
        total += blocks + 4 * math.ceil(blocks / _NESTED_BLOCKSIZE) + 4 * _NESTED_CODE_ENTRIES + 4
    else:
        total += 4 * blocks
    return total


def _dequantize(layer: MetaLinear4bit, dtype: torch.dtype, device: torch.device,
                forward: bool) -> list[torch.Tensor]:
    """The buffers of one dequantization, allocated as bitsandbytes allocates them; the
    dequantized weight last. The forward (``gemm_4bit``'s CUDA fallback) keeps the fp32
    scales and their offset copy alive through the matmul; the backward
    (``functional.dequantize_4bit``) adds the offset in place."""
    buffers = []
    if layer.spec.double_quant:
        scales = torch.empty(_scale_blocks(layer.numel, layer.spec), dtype=torch.float32,
                             device=device)
        buffers += [scales, scales + 0] if forward else [scales]
    return [*buffers, torch.empty(layer.shape, dtype=dtype, device=device)]


class _Matmul4bit(torch.autograd.Function):
    """``F.linear`` through a weight dequantized on the fly, saving nothing of it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: MetaLinear4bit) -> torch.Tensor:
        ctx.layer = layer
        buffers = _dequantize(layer, x.dtype, x.device, forward=True)
        return F.linear(x, buffers[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        buffers = _dequantize(ctx.layer, grad.dtype, grad.device, forward=False)
        return torch.matmul(grad, buffers[-1]), None


class MetaLinear4bit(nn.Module):
    """A bias-free linear layer stored in 4 bits, allocating what bitsandbytes allocates.

    The packed weight is a frozen ``uint8`` parameter of ``ceil(numel / 2)`` bytes (what
    ``Params4bit`` holds); :attr:`storage_bytes` adds the quantization constants.

    Example:
        >>> layer = MetaLinear4bit(nn.Linear(128, 64, bias=False))
        >>> layer(torch.ones(3, 128)).shape, layer.weight.dtype
        (torch.Size([3, 64]), torch.uint8)
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec | None = None) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("MetaLinear4bit models bias-free linear layers only")
        self.spec = spec or QuantSpec()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.shape = (linear.out_features, linear.in_features)
        self.numel = linear.out_features * linear.in_features
        self.weight = nn.Parameter(torch.empty((math.ceil(self.numel / 2), 1), dtype=torch.uint8,
                                               device=linear.weight.device),
                                   requires_grad=False)

    @property
    def storage_bytes(self) -> int:
        """Packed weight plus quantization constants, in bytes."""
        return quantized_weight_bytes(self.numel, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Matmul4bit.apply(x, self)


def quantize_block_linears(block: nn.Module, spec: QuantSpec) -> list[MetaLinear4bit]:
    """Replace every ``nn.Linear`` of ``block`` by a :class:`MetaLinear4bit` (as loading with
    ``BitsAndBytesConfig(load_in_4bit=True)`` does); returns the new layers."""
    out: list[MetaLinear4bit] = []
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear):
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            layer = MetaLinear4bit(module, spec)
            setattr(parent, name.rsplit(".", 1)[-1], layer)
            out.append(layer)
    return out
