"""A plain accelerate training loop with IST: LoRA on a tiny random-init Llama.

Run: python examples/accelerate_loop.py [--steps 40] [--cpu]
     accelerate launch examples/accelerate_loop.py   # same script, your accelerate config

accelerator.prepare() wraps ISTOptimizer like any torch optimizer; gradient accumulation
(accelerator.accumulate), clipping and accelerator.save_state / load_state work as usual
(the IST state travels inside the optimizer's state dict).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ist_optim import ImportanceHistory, ISTOptimizer
from ist_optim.integrations import unwrap_ist_optimizer


def make_data(size: int, seq: int = 32, seed: int = 0) -> list[dict]:
    """Sequences of a repeated 4-token motif over a 16-token alphabet."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 16, (size, 4), generator=g).repeat(1, seq // 4)
    return [{"input_ids": row, "labels": row} for row in ids]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU")
    parser.add_argument("--save-state", default=None, help="directory for save_state at the end")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu, gradient_accumulation_steps=args.accumulation)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = get_peft_model(LlamaForCausalLM(config),
                               LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                          target_modules=["q_proj", "v_proj", "up_proj"],
                                          modules_to_save=["lm_head"]))
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=2e-2, weight_decay=0.0, seed=args.seed,
                       active_layers=0.25, update_interval=5)
    loader = torch.utils.data.DataLoader(make_data(args.steps * args.accumulation * 4),
                                         batch_size=4, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    ist = unwrap_ist_optimizer(opt)  # the ISTOptimizer inside accelerate's wrapper
    history = ImportanceHistory(ist.num_layers)

    model.train()
    trained = ist.active_layers
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                trained = ist.active_layers  # the layers this step updates
            opt.step()  # steps only at the end of each accumulation window
            opt.zero_grad()
        if accelerator.sync_gradients:
            history.record(ist, trained)
            if ist.num_steps % 10 == 0 or ist.num_steps == 1:
                state_kib = ist.memory_report()["state_bytes_on_device"] / 1024
                accelerator.print(f"step {ist.num_steps:3d}  loss {loss.item():.3f}  "
                                  f"trained {trained}  optimizer state {state_kib:.0f} KiB")
        if ist.num_steps >= args.steps:
            break
    if args.save_state:
        accelerator.save_state(args.save_state)
    importance = " ".join(f"{v:+.3f}" for v in ist.importance.tolist())
    accelerator.print(f"final importance [{importance}]")
    return {"optimizer": ist, "history": history, "model": model, "loss": loss.item()}


if __name__ == "__main__":
    main()
