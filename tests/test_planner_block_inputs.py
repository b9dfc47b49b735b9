"""What the planner runs a block with (ist_optim/planner/block_inputs.py): the mask the
installed transformers builds, the rotary tables without autocast on meta, the kernels'
FLOPs for grouped-query attention."""

from __future__ import annotations

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig

from ist_optim.planner.block_inputs import (
    GQA_FLOPS,
    FlashAttention,
    block_mask,
    rotary_embeddings,
)

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)


def test_the_mask_is_the_installed_transformers_one():
    mask = block_mask(CONFIG, "sdpa", batch_size=3, seq_len=16)
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert mask is None  # the kernel's causal flag does it
    else:  # 4.x without a KV cache: a mask per batch element
        assert mask is not None and mask.device.type == "meta"
        assert tuple(mask.shape) == (3, 1, 16, 16)


def test_rotary_tables_on_meta_have_the_models_shape():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        rotary = LlamaRotaryEmbedding(CONFIG)
    probe = torch.empty(2, 16, 64, device="meta", dtype=torch.bfloat16)
    cos, sin = rotary_embeddings(rotary, probe, torch.arange(16, device="meta")[None])
    assert cos.shape == sin.shape == (1, 16, 16) and cos.dtype == torch.bfloat16


def _flops(query, key, value, mapping=None):
    counter = FlopCounterMode(display=False, custom_mapping=mapping or {})
    with counter, FlashAttention():
        torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                         enable_gqa=True)
    return counter.get_total_flops()


def test_grouped_query_flops_are_those_of_the_repeated_heads():
    query = torch.empty(2, 4, 16, 8, device="meta")
    key = torch.empty(2, 2, 16, 8, device="meta")
    repeated = torch.empty(2, 4, 16, 8, device="meta")
    expected = _flops(query, repeated, repeated)
    assert _flops(query, key, key, GQA_FLOPS) == expected > 0


def test_a_mask_runs_the_memory_efficient_kernel_and_saves_its_bias():
    """What a GPU saves for a masked call: query, key, value, output, log-sum-exp and the
    mask as a bias in the query's dtype (what transformers 4.x makes each block hold)."""
    query = torch.empty(2, 4, 16, 8, device="meta", requires_grad=True)
    mask = torch.ones(2, 1, 16, 16, dtype=torch.bool, device="meta")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                  lambda t: t), FlashAttention():
        out = torch.nn.functional.scaled_dot_product_attention(query, query, query,
                                                               attn_mask=mask)
    assert out.shape == query.shape
    biases = [t for t in saved if t.shape[-2:] == (16, 16)]
    assert biases and all(t.dtype == query.dtype for t in biases)
