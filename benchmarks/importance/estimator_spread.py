"""How far each estimator moves the sampling distribution, and whether it ranks layers
like measured suppression, on a small Llama trained with IST on Shakespeare (CPU).

For each estimator, a fresh copy of the same model (same LoRA init, same batches) trains
``--steps`` steps with ``ISTOptimizer`` (AdamW, 25% of layers, T=10, the paper's defaults
otherwise). Reported: the sampling max/min ratio after rounds 1, 3, 5 and the last, the
KL from uniform at the end, and the Spearman correlation of the final importance with the
measured importance (loss increase when damping one layer's adapters by lambda=0.25, on a
held-out batch, measured once after the run on each model).

Run (the configuration of docs/benchmarks.md)::

    OMP_NUM_THREADS=1 python -m benchmarks.importance.estimator_spread --layers 8 --hidden 256 \
        --seq 128 --batch 2 --steps 100
"""

from __future__ import annotations

import torch

from ist_optim import ISTOptimizer

from ..benchkit.data import random_batch, shakespeare_bytes
from ..benchkit.models import llama_config, random_llama, shape_parser
from ..benchkit.report import spearman


def main() -> None:
    parser = shape_parser(__doc__, layers=8, batch=2)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    tokens = shakespeare_bytes()
    held_out = random_batch(tokens, 4, args.seq, torch.Generator().manual_seed(99))
    print(f"Llama {args.layers} layers x hidden {args.hidden}, LoRA r8, batch {args.batch} x "
          f"seq {args.seq}, {args.steps} steps, T=10, torch threads {torch.get_num_threads()}")
    print("| estimator | max/min after round 1 | round 3 | round 5 | last round | KL from "
          "uniform (last) | Spearman(importance, measured suppression) | final loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for estimator in ("paper", "normalized", "first-order"):
        model = random_llama(llama_config(args.layers, args.hidden), lora_rank=8)
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=args.lr, estimator=estimator, seed=0)
        gen = torch.Generator().manual_seed(1)
        ratios = []
        for step in range(args.steps):
            model(**random_batch(tokens, args.batch, args.seq, gen)).loss.backward()
            opt.step()
            opt.zero_grad()
            if (step + 1) % opt.update_interval == 0:
                ratios.append(opt.sampling_spread()["max_min_ratio"])
        kl = opt.sampling_spread()["kl_from_uniform"]
        opt.close()  # re-enable all layers before measuring
        with torch.no_grad():
            base = float(model(**held_out).loss)
        opt_measure = ISTOptimizer(torch.optim.SGD, model, lr=0.0, active_layers=1.0)
        losses = opt_measure.measure_suppressed_losses([[i] for i in range(opt.num_layers)],
                                                       held_out)
        opt_measure.close()
        rho = spearman(opt.importance, losses - base)
        picks = [ratios[i] for i in (0, 2, 4) if i < len(ratios)] + [ratios[-1]]
        print(f"| {estimator} | " + " | ".join(f"{r:.4f}" for r in picks)
              + f" | {kl:.4f} | {rho:+.2f} | {base:.3f} |")


if __name__ == "__main__":
    main()
