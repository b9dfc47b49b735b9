"""``memory_budget=`` on CPU: predicted peak vs the exactly accounted peak of budgeted steps.

A random-init Llama (hidden 256, 8 layers, vocab 1024, float32), LoRA r8 on q, k, v, up,
down, AdamW (``foreach=False``), ``state_policy="drop"``, batch 4 x 64. The budget is the
predicted peak of training layers [6, 7] without checkpointing; each row trains a fixed
active set under it (the step after a warm-up step is accounted with
:func:`ist_optim.account_step`: exact tensor bytes), and once more without a budget.

Run::

    OMP_NUM_THREADS=1 python -m benchmarks.memory.accounted
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from ist_optim import ISTOptimizer, account_step

from ..benchkit.models import random_llama

CONFIG = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=1024,
                     use_cache=False)


def _model() -> torch.nn.Module:
    return random_llama(CONFIG, seed=0, lora_rank=8)


def run(active: list[int], budget: int | None) -> tuple[dict, int]:
    """(memory_report before the accounted step, its accounted peak bytes)."""
    model = _model()
    ids = torch.randint(0, CONFIG.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    extra = {} if budget is None else {"memory_budget": budget, "memory_shape": (4, 64)}
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-4, foreach=False, state_policy="drop",
                       sampling="uniform", active_layers=len(active), seed=0, **extra)
    held = {}

    def step() -> None:
        opt.set_active_layers(active)
        held["out"] = model(input_ids=ids, labels=ids)
        held["out"].loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    opt.set_active_layers(active)
    report = opt.memory_report()
    return report, account_step(step, model=model, optimizer=opt).peak_bytes


def main() -> None:
    budget = run([6, 7], 2**30)[0]["predicted_peak_bytes"]
    print(f"budget: {budget:,} bytes")
    print("| active | checkpointed | predicted | accounted | <= budget | accounted, no budget |")
    print("| --- | --- | ---: | ---: | --- | ---: |")
    for active in ([6, 7], [3, 7], [0, 7], [0, 1]):
        report, peak = run(active, budget)
        _, unbudgeted = run(active, None)
        print(f"| {active} | {report['checkpointed_layers']} | "
              f"{report['predicted_peak_bytes']:,} | {peak:,} | {peak <= budget} | "
              f"{unbudgeted:,} |")


if __name__ == "__main__":
    main()
