"""Quickstart: fine-tune a tiny random-init Llama with LoRA + IST on CPU in seconds.

Run: python examples/quickstart.py [--steps 40]
Prints the layers trained at each step and the learned importance as training goes.
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ist_optim import ISTOptimizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
    rng = torch.Generator().manual_seed(args.seed)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = get_peft_model(LlamaForCausalLM(config),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))

    # The one line that changes: AdamW(model.parameters(), lr=...) becomes
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=5e-3, seed=args.seed, update_interval=5)
    print(f"{opt.num_layers} layers found, {opt.num_active} trained per step")

    # A toy task: learn to repeat a fixed pattern of tokens.
    pattern = torch.randint(0, 128, (1, 32), generator=rng)
    for step in range(1, args.steps + 1):
        batch = {"input_ids": pattern.repeat(4, 1), "labels": pattern.repeat(4, 1)}
        trained = opt.active_layers
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 5 == 0 or step == 1:
            importance = " ".join(f"{v:+.3f}" for v in opt.importance.tolist())
            print(f"step {step:3d}  loss {loss.item():.3f}  trained {trained}  "
                  f"importance [{importance}]")


if __name__ == "__main__":
    main()
