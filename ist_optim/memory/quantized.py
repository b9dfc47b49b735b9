"""Moved to :mod:`ist_optim.planner.quantized` (the offline planner has its own package); this
module re-exports its names for code that imports them from here."""

from ..planner.quantized import (
    MetaLinear4bit,
    QuantSpec,
    quantize_block_linears,
    quantized_weight_bytes,
)

__all__ = ["QuantSpec", "MetaLinear4bit", "quantize_block_linears", "quantized_weight_bytes"]
