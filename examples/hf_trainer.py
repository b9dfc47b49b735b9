"""Fine-tune with the Hugging Face Trainer and IST: LoRA on a tiny random-init Llama (CPU).

Run: python examples/hf_trainer.py [--steps 60] [--output-dir ist-trainer-out]
     python examples/hf_trainer.py --route cls   # via Trainer(optimizer_cls_and_kwargs=...)
     python examples/hf_trainer.py --resume ist-trainer-out/checkpoint-30

The Trainer builds the LR scheduler, accumulates gradients, clips them, evaluates and
saves checkpoints (the IST scores, sampler state and active set are in optimizer.pt).
ISTCallback adds ist/* keys to every training log and writes importance.png at the end.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from ist_optim import ISTOptimizer
from ist_optim.integrations import add_ist_callback, ist_optimizer_cls, unwrap_ist_optimizer


class CopyTask(torch.utils.data.Dataset):
    """Sequences made of a repeated random motif: learnable by a tiny model in a few steps."""

    def __init__(self, size: int, seq: int = 32, vocab: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        motifs = torch.randint(0, 16, (size, 4), generator=g)  # a 16-token alphabet
        self.ids = motifs.repeat(1, seq // 4)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(num_layers: int, seed: int):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = LlamaForCausalLM(config)
        # lm_head in modules_to_save: outside the blocks, so IST trains it every step.
        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                               target_modules=["q_proj", "v_proj", "up_proj"],
                                               modules_to_save=["lm_head"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--output-dir", default="ist-trainer-out")
    parser.add_argument("--route", choices=["instance", "cls"], default="instance")
    parser.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    model = build_model(args.layers, args.seed)
    ist = dict(seed=args.seed, active_layers=0.25, update_interval=5)
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.steps, learning_rate=2e-2,
        lr_scheduler_type="cosine", warmup_steps=max(args.steps // 10, 1),
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=1.0,
        eval_strategy="steps", eval_steps=max(args.steps // 2, 1), per_device_eval_batch_size=8,
        save_steps=max(args.steps // 2, 1), logging_steps=max(args.steps // 6, 1),
        report_to="none", use_cpu=not torch.cuda.is_available(), seed=args.seed,
        data_seed=args.seed, disable_tqdm=True,
    )
    data = dict(train_dataset=CopyTask(256, seed=args.seed),
                eval_dataset=CopyTask(16, seed=args.seed + 1))
    if args.route == "instance":
        # The one line that changes: the Trainer gets IST instead of building AdamW.
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=2e-2, weight_decay=0.0, **ist)
        trainer = Trainer(model=model, args=training_args, optimizers=(opt, None), **data)
    else:
        # The Trainer builds it as cls(param_groups, lr=...); lr must be in the kwargs.
        cls = ist_optimizer_cls(model, torch.optim.AdamW, **ist)
        trainer = Trainer(model=model, args=training_args,
                          optimizer_cls_and_kwargs=(cls, {"lr": 2e-2}), **data)
    plot = Path(args.output_dir) / "importance.png"
    callback = add_ist_callback(trainer, importance_batches="eval", plot_path=plot)
    result = trainer.train(resume_from_checkpoint=args.resume)

    opt = unwrap_ist_optimizer(trainer.optimizer)
    for entry in trainer.state.log_history:
        if "loss" in entry:
            trained = [i for i in range(opt.num_layers) if entry[f"ist/active_layer_{i}"] > 0]
            print(f"step {entry['step']:4d}  loss {entry['loss']:.3f}  "
                  f"layers trained since last log {trained}")
    importance = " ".join(f"{v:+.3f}" for v in opt.importance.tolist())
    print(f"final importance [{importance}]; train loss {result.training_loss:.3f}")
    print(f"importance plot: {plot}")
    return {"optimizer": opt, "trainer": trainer, "history": callback.history, "plot": plot,
            "train_loss": result.training_loss}


if __name__ == "__main__":
    main()
