"""The measurements ``memory_plan.py`` compares the memory planner with: peaks of a
LLaMA-2-7B shape on one H200, and accounted steps (:func:`ist_optim.account_step`, exact
tensor bytes) of small random Llamas on CPU. ``tests/test_memory_estimate.py`` checks the
planner against the same data.
"""

from __future__ import annotations

from typing import Any

import torch

from ist_optim import account_step

from .models import random_llama

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                 max_position_embeddings=2048)
RAND = [1, 8, 13, 15, 16, 24, 28, 31]  # the draw of gpu_anchor.py (random.seed(0))
TOP = list(range(24, 32))

# Peak allocated GPU memory (GiB, torch.cuda.max_memory_allocated) measured on one H200,
# 2026-11-29, by shared/bench/gpu_anchor.py: LLaMA-2-7B shape, bf16, batch 8 x 512, LoRA r32
# on q,k,v,up,down with peft's default fp32 adapters, 7 steps of `out = model(...);
# out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`. Raw lines:
# shared/bench/h200_7b_2026-11-29.jsonl and h200_7b_gc_2026-11-29.jsonl.
# (row, measured GiB, planner, estimate keywords)
H200 = [
    ("lora", 44.48, "lora", {}),
    ("lora_top25", 22.02, "lora", {"active_layers": TOP}),
    ("lora_rand25", 33.58, "lora", {"active_layers": RAND}),
    ("full", 62.32, "full", {"train_embeddings": True, "train_head": True}),
    ("full_lisa2", 33.43, "full", {"active_layers": [24, 26], "train_embeddings": True,
                                   "train_head": True}),
    ("full_bnb8", 49.98, "bnb8", {"train_embeddings": True, "train_head": True}),
    # BAdam: one block trains (layer 30 was drawn), fp32 master copy and state
    ("full_badam", 17.80, "badam", {"active_layers": [30]}),
    # gradient checkpointing with enable_input_require_grads(): backward through all blocks
    ("lora_gc", 16.01, "lora", {"gradient_checkpointing": True, "cut_backward": False}),
    ("lora_rand25_gc", 15.70, "lora", {"active_layers": RAND, "gradient_checkpointing": True,
                                       "cut_backward": False}),
    ("lora_top25_gc", 15.70, "lora", {"active_layers": TOP, "gradient_checkpointing": True,
                                      "cut_backward": False}),
    # the anchor's detach hook ran inside the checkpointed call, so the frozen blocks'
    # checkpoint inputs stayed alive; the estimate models a cut before the checkpoint
    # (BackwardCut), which frees them: 14.9 GiB predicted, 5% under the anchor's 15.7
    ("lora_rand25_gc_detach", 15.70, "lora", {"active_layers": RAND,
                                              "gradient_checkpointing": True}),
    ("lora_top25_gc_detach", 15.70, "lora", {"active_layers": TOP,
                                             "gradient_checkpointing": True}),
]

#: (method, active layers, train embeddings, train head) of the accounted CPU runs
CPU_CASES = [
    ("lora", [0, 1, 2, 3], False, False),
    ("lora", [2, 3], False, False),
    ("full", [1], False, False),
    ("full", [0, 1, 2, 3], True, True),
    ("full", [3], True, True),
]


def accounted_step(config: Any, method: str, active: list[int], *, embeddings: bool = False,
                   head: bool = False, rank: int = 8, keep_output: bool = True,
                   checkpointing: bool = False) -> Any:
    """One accounted steady-state step (an :class:`ist_optim.StepAccount`) of a random-init
    model of ``config`` on CPU (float32, batch 4 x 64): ``method`` ``"lora"`` (rank
    ``rank``) or ``"full"``, only the blocks ``active`` trained (with ``"full"``, the
    embeddings and the head as asked); the loop holds the model's output through backward
    (``keep_output``) or only the loss."""
    model = random_llama(config, seed=0, lora_rank=rank if method == "lora" else None)
    model.config.use_cache = False
    if method == "full":
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            if ".layers." in name:
                p.requires_grad_(int(name.split(".layers.")[1].split(".")[0]) in active)
            elif "embed_tokens" in name:
                p.requires_grad_(embeddings)
            else:
                p.requires_grad_(head)
    else:
        for name, p in model.named_parameters():
            if p.requires_grad and int(name.split(".layers.")[1].split(".")[0]) not in active:
                p.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            foreach=False)
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    held = {}

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        if keep_output:
            held["out"] = out
        loss = out.loss
        del out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return account_step(step, model=model, optimizer=opt)
