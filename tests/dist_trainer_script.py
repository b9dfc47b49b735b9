"""HF Trainer + DDP (gloo, CPU) with an ISTOptimizer; run by tests/test_distributed.py as

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/dist_trainer_script.py OUT_DIR [instance|cls]

``instance`` (default): ``Trainer(optimizers=(ISTOptimizer(...), None))``, the importance
batch captured from training. ``cls``: ``Trainer(optimizer_cls_and_kwargs=...)`` (the
Trainer builds the optimizer) with ``add_ist_callback(importance_batches="eval")``, each
rank measuring on its shard of the eval set. Each rank saves its LoRA weights and IST
fingerprint to OUT_DIR/rank{N}.pt.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback

import torch
import torch.distributed as dist
from conftest import lm_batch, lora_model
from transformers import Trainer, TrainingArguments

from ist_optim import ISTOptimizer
from ist_optim.distributed import check_ranks_agree
from ist_optim.integrations import add_ist_callback, ist_optimizer_cls, unwrap_ist_optimizer


def main(out: str, route: str) -> None:
    torch.set_num_threads(1)
    # TrainingArguments initializes torch.distributed: build the optimizer after it.
    args = TrainingArguments(
        output_dir=out, use_cpu=True, ddp_backend="gloo", max_steps=20,
        per_device_train_batch_size=2, learning_rate=1e-3, save_strategy="no",
        report_to=[], disable_tqdm=True, logging_steps=10, seed=0,
    )
    model = lora_model(4)
    data = [lm_batch(1, seq=8, seed=i) for i in range(100)]
    rows = [{k: v[0] for k, v in row.items()} for row in data]
    ist = dict(active_layers=1, update_interval=5)
    if route == "instance":
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, **ist)
        trainer = Trainer(model=model, args=args, train_dataset=rows[:80],
                          optimizers=(opt, None))
    else:
        trainer = Trainer(model=model, args=args, train_dataset=rows[:80], eval_dataset=rows[80:],
                          optimizer_cls_and_kwargs=(ist_optimizer_cls(
                              model, torch.optim.AdamW, **ist), {"lr": 1e-3}))
        add_ist_callback(trainer, importance_batches="eval")
    trainer.train()
    opt = unwrap_ist_optimizer(trainer.optimizer)
    wrapped = trainer.model_wrapped
    torch.save({
        "world_size": dist.get_world_size(),
        "wrapper": type(wrapped).__name__,
        "find_unused": getattr(wrapped, "find_unused_parameters", None),
        "fingerprint": check_ranks_agree(opt),
        "rounds": opt.num_steps // opt.update_interval - opt.skipped_rounds,
        "captures": opt.rounds.batches.captures,
        "params": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
    }, f"{out}/rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    code = 1
    try:
        main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "instance")
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        # A rank whose results are written leaves within 30 s whatever its teardown does
        # (on the floor row, torch 2.7, the launch outlived its ranks' results by 300 s
        # inside the full suite).
        if code == 0:
            threading.Timer(30.0, os._exit, args=(0,)).start()
        # Shut gloo down before the interpreter does: left to exit, a rank can abort in
        # teardown ("terminate called without an active exception", SIGABRT) after the
        # training itself succeeded.
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        # Then leave without the interpreter's shutdown: on torch 2.7 a rank that had
        # written its results hung there (futex wait, inductor's compile-worker pool still
        # running), and the test timed out on the floor row.
        os._exit(code)
