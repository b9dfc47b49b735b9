"""IST under DDP or FSDP2: a tiny random-init Llama + LoRA on CPU (gloo) or GPUs (nccl).

Run:
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/ddp_train.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --fsdp2
    accelerate launch --cpu --num_processes 2 examples/ddp_train.py

Every rank prints the layers it trains; they are the same on every rank, and at the end
``check_ranks_agree`` confirms that every rank holds the same IST state.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

from ist_optim import ISTOptimizer
from ist_optim.distributed import check_ranks_agree


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fsdp2", action="store_true", help="shard with fully_shard")
    args = parser.parse_args(argv)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)  # 1. the process group first
    rank = dist.get_rank()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if backend == "nccl" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # same initial weights on every rank
        model = get_peft_model(LlamaForCausalLM(config),
                               LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.to(device)

    if args.fsdp2:  # 2a. FSDP2: shard every block, then the root; IST takes the sharded model
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.model.layers:
            fully_shard(block)
        fully_shard(model)
        train_model = model
    else:  # 2b. DDP: find_unused_parameters=True lets inactive layers go without grads
        train_model = DistributedDataParallel(model, find_unused_parameters=True)

    # 3. The optimizer: seed=None on every rank -> rank 0's seed is used everywhere.
    opt = ISTOptimizer(torch.optim.AdamW, train_model, lr=5e-3, update_interval=5)

    g = torch.Generator().manual_seed(rank)  # each rank its own data
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, 128, (4, 32), generator=g).to(device)
        trained = opt.active_layers
        loss = train_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 5 == 0:
            print(f"rank {rank} step {step:3d} loss {loss.item():.3f} trained {trained}")
    state = check_ranks_agree(opt)  # raises on every rank if any rank differs
    if rank == 0:
        print(f"all ranks agree: step {state['num_steps']}, active {state['active_layers']}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
