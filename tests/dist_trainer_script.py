"""HF Trainer + DDP (gloo, CPU) with an ISTOptimizer; run by tests/test_distributed.py as

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/dist_trainer_script.py OUT_DIR

Each rank saves its LoRA weights and IST fingerprint to OUT_DIR/rank{N}.pt.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from conftest import lm_batch, lora_model
from transformers import Trainer, TrainingArguments

from ist_optim import ISTOptimizer
from ist_optim.distributed import check_ranks_agree


def main(out: str) -> None:
    torch.set_num_threads(1)
    # TrainingArguments initializes torch.distributed: build the optimizer after it.
    args = TrainingArguments(
        output_dir=out, use_cpu=True, ddp_backend="gloo", max_steps=20,
        per_device_train_batch_size=2, learning_rate=1e-3, save_strategy="no",
        report_to=[], disable_tqdm=True, logging_steps=10, seed=0,
    )
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, active_layers=1, update_interval=5)
    data = [lm_batch(1, seq=8, seed=i) for i in range(80)]
    train_dataset = [{k: v[0] for k, v in row.items()} for row in data]
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                      optimizers=(opt, None))
    trainer.train()
    wrapped = trainer.model_wrapped
    torch.save({
        "world_size": dist.get_world_size(),
        "wrapper": type(wrapped).__name__,
        "find_unused": getattr(wrapped, "find_unused_parameters", None),
        "fingerprint": check_ranks_agree(opt),
        "rounds": opt.num_steps // opt.update_interval - opt._skipped_rounds,
        "params": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
    }, f"{out}/rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
