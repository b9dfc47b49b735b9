"""IST with every supported PEFT method (and full fine-tuning), side by side on CPU.

Run: python examples/peft_methods.py [--steps 30] [--methods lora dora ia3]

Each method gets the same tiny random-init Llama, data and IST settings; the script prints
the final loss, the trainable parameter count and the learned importance.
"""

from __future__ import annotations

import argparse

import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ist_optim import ISTOptimizer

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
    "rslora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=True),
    "dora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=True),
    "ia3": lambda: IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]),
    "loha": lambda: LoHaConfig(r=8, alpha=16, target_modules=TARGETS),
    "lokr": lambda: LoKrConfig(r=8, alpha=16, target_modules=TARGETS),
    "full": None,  # no adapters: every block weight trains when its layer is sampled
}
LEARNING_RATES = {"ia3": 5e-2, "full": 1e-3}


def build(method: str, num_layers: int, seed: int):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        make_config = CONFIGS[method]
        return model if make_config is None else get_peft_model(model, make_config())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--methods", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    motifs = torch.randint(0, 16, (args.steps, 4, 4), generator=g)
    results = {}
    for method in args.methods:
        model = build(method, args.layers, args.seed)
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=LEARNING_RATES.get(method, 1e-2),
                           seed=args.seed, update_interval=5)
        trainable = sum(p.numel() for ps in opt.groups.params for p in ps)
        for step in range(args.steps):
            ids = motifs[step].repeat(1, 8)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        importance = " ".join(f"{v:+.3f}" for v in opt.importance.tolist())
        print(f"{method:7s} loss {loss.item():.3f}  {trainable:8d} params in "
              f"{opt.num_layers} layers  importance [{importance}]")
        results[method] = {"loss": loss.item(), "optimizer": opt}
    return results


if __name__ == "__main__":
    main()
