"""Per-piece costs measured on the meta device (ist_optim/planner/blocks.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from ist_optim.planner.blocks import (
    BLOCK_MODES,
    HEAD_MODES,
    MetaLora4bitLinear,
    MetaLoraLinear,
    measure_model,
)
from ist_optim.planner.quantized import MetaLinear4bit, QuantSpec, quantized_weight_bytes

BATCH, SEQ = 2, 16
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, vocab_size=256)
LORA = (["q_proj", "v_proj"], 4, 8.0, torch.float32)


@pytest.fixture(scope="module")
def costs():
    """Full training, LoRA, and QLoRA (bf16 base) costs of CONFIG, measured once."""
    return {
        "full": measure_model(CONFIG, batch_size=BATCH, seq_len=SEQ, dtype=torch.float32,
                              lora=None),
        "lora": measure_model(CONFIG, batch_size=BATCH, seq_len=SEQ, dtype=torch.float32,
                              lora=LORA),
        "qlora": measure_model(CONFIG, batch_size=BATCH, seq_len=SEQ, dtype=torch.bfloat16,
                               lora=LORA, quant=QuantSpec()),
    }


def test_sizes_are_the_model_shapes(costs):
    full = costs["full"]
    block = LlamaDecoderLayer(CONFIG, 0)
    assert full.num_layers == 4
    assert full.block_param_count == sum(p.numel() for p in block.parameters())
    assert full.block_weight_bytes == 4 * full.block_param_count
    assert full.hidden_bytes == 4 * BATCH * SEQ * 64
    assert full.logits_bytes == 4 * BATCH * SEQ * 256
    assert full.embed_bytes == full.head_bytes == 4 * 256 * 64  # untied
    assert set(full.blocks) == set(BLOCK_MODES) and set(full.heads) == set(HEAD_MODES)
    assert not full.quantized and full.adapter_bytes == 0


def test_a_block_below_the_lowest_trained_one_saves_nothing(costs):
    for name in ("full", "lora", "qlora"):
        below = costs[name].blocks[(False, False)]
        assert below.saved_bytes == below.backward_flops == below.backward_extra_bytes == 0
        through = costs[name].blocks[(False, True)]
        assert through.saved_bytes > 0 and through.backward_flops > 0


def test_a_trained_block_saves_at_least_what_a_frozen_one_backward_passes_through(costs):
    full = costs["full"]
    assert full.blocks[(True, True)].saved_bytes >= full.blocks[(False, True)].saved_bytes
    assert full.blocks[(True, True)].backward_flops > full.blocks[(False, True)].backward_flops


def test_lora_adds_the_adapters_and_keeps_the_base(costs):
    lora, full = costs["lora"], costs["full"]
    # q_proj and v_proj: A (rank x 64) and B (64 x rank) each
    assert lora.adapter_param_count == 2 * (4 * 64 + 64 * 4)
    assert lora.adapter_bytes == 4 * lora.adapter_param_count
    assert lora.block_param_count == full.block_param_count
    # the base weights are frozen: no weight gradients to compute
    assert lora.blocks[(True, True)].backward_flops < full.blocks[(True, True)].backward_flops


def test_qlora_stores_the_block_linears_in_4_bits(costs):
    qlora = costs["qlora"]
    block = LlamaDecoderLayer(CONFIG, 0)
    linears = [m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear)]
    norms = sum(p.numel() for n, p in block.named_parameters() if "norm" in n)
    assert qlora.quantized
    assert qlora.block_weight_bytes == (sum(quantized_weight_bytes(n, QuantSpec())
                                            for n in linears) + 2 * norms)
    assert qlora.hidden_bytes == 2 * BATCH * SEQ * 64


def test_the_lora_stand_ins_compute_what_peft_computes():
    torch.manual_seed(0)
    base = nn.Linear(8, 4, bias=False)
    layer = MetaLoraLinear(base, rank=2, alpha=4.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    expected = base(x) + layer.lora_B(layer.lora_A(x)) * 2.0
    assert torch.allclose(layer(x), expected)
    half = MetaLoraLinear(nn.Linear(8, 4, bias=False).to(torch.bfloat16), 2, 4.0)
    assert half(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    quant = MetaLora4bitLinear(MetaLinear4bit(nn.Linear(8, 4, bias=False, device="meta")), 2, 4)
    assert quant(torch.empty(3, 8, device="meta")).shape == (3, 4)


def test_a_fresh_interpreter_plans_a_named_shape():
    """`ist-finetune plan` in a new process: the planner builds its one-block model under
    the meta device, and on torch 2.7 importing transformers' Llama module inside that
    context failed ("Could not find LlamaForCausalLM"; the floor row found it), so the class
    is imported first (`import_model_class`)."""
    import os
    import subprocess
    import sys

    code = ("from ist_optim.planner.shapes import load_config\n"
            "from ist_optim import MemoryPlanner\n"
            "MemoryPlanner(load_config('smollm2-135m'), batch_size=1, seq_len=8)\n"
            "print('planned')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and "planned" in proc.stdout, proc.stderr[-2000:]
