"""4-bit weights of the planner (ist_optim/planner/quantized.py): bitsandbytes' bytes, and a
meta-device stand-in that allocates them."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ist_optim.planner.quantized import (
    MetaLinear4bit,
    QuantSpec,
    quantize_block_linears,
    quantized_weight_bytes,
)


@given(st.integers(1, 10**7), st.sampled_from([32, 64, 128]), st.booleans())
def test_bytes_are_packed_nibbles_plus_scales_plus_codes(numel, blocksize, double):
    spec = QuantSpec(double_quant=double, blocksize=blocksize)
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2) + 4 * 16
    if double:  # 8-bit scales, their float32 scales per 256, the 8-bit code, the offset
        expected = packed + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
    else:
        expected = packed + 4 * blocks
    assert quantized_weight_bytes(numel, spec) == expected


@pytest.mark.parametrize("blocksize", [1, 0, True, 2.0])
def test_a_bad_blocksize_is_refused(blocksize):
    with pytest.raises(ValueError, match="blocksize must be an integer >= 2"):
        QuantSpec(blocksize=blocksize)


def test_the_stand_in_holds_the_packed_weight_and_computes_on_meta():
    layer = MetaLinear4bit(nn.Linear(64, 32, bias=False, device="meta"), QuantSpec(True))
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 64 * 32 // 2
    assert not layer.weight.requires_grad
    assert layer.storage_bytes == quantized_weight_bytes(64 * 32, QuantSpec(True))
    x = torch.empty(3, 64, device="meta", requires_grad=True)
    out = layer(x)
    assert out.shape == (3, 32) and out.device.type == "meta"
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape  # the input gradient flows
    with pytest.raises(ValueError, match="bias-free"):
        MetaLinear4bit(nn.Linear(4, 4))


def test_every_linear_of_a_block_is_replaced():
    block = nn.Sequential(nn.Linear(8, 8, bias=False),
                          nn.Sequential(nn.Linear(8, 4, bias=False), nn.ReLU()))
    replaced = quantize_block_linears(block, QuantSpec())
    assert len(replaced) == 2
    assert isinstance(block[0], MetaLinear4bit) and isinstance(block[1][0], MetaLinear4bit)
    assert not any(isinstance(m, nn.Linear) for m in block.modules())
