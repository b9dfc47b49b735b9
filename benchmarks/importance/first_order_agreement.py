"""First-order importance vs response suppression: rank agreement and cost.

1. Agreement. A small Llama with LoRA r8 trains on Shakespeare (byte tokens, all layers,
   AdamW); at each stage, on one fixed batch in eval mode, every layer's adapters are damped
   one at a time by ``lambda`` and the loss change is measured (``L`` forwards), and the
   first-order prediction ``(lambda - 1) <dL/dy_i, y_i>`` is read from one backward pass
   (:class:`ist_optim.FirstOrderProbe`). Reported: Spearman rank correlation
   of the two per-layer vectors, for lambda = 0.25 (the paper's) and 0.9.
2. Cost. ``ISTOptimizer`` with every layer active (so all configurations train the same
   layers and differ only in the estimator), steps interleaved; medians side by side:
   no rounds (baseline), ``estimator="first-order"`` (hooks every step, rounds every T=10)
   and ``estimator="paper"`` (K=3 suppressed forwards every T=10 steps); "first-order
   hooks, no rounds" isolates the per-step cost of the backward hooks. Then a paired
   measurement of the hooks alone: one model at lr 0, each batch stepped with and without
   the hooks (alternating order), median of the per-pair ratios, and the share of the step
   spent inside the hook functions and ``end_step`` (timed from within; excludes only the
   dispatch of the hook calls).

Run (the configuration of docs/benchmarks.md)::

    OMP_NUM_THREADS=1 python -m benchmarks.importance.first_order_agreement --layers 8 \
        --hidden 256 --seq 128 --batch 2 --stages 5 20 60 --timed-steps 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ist_optim import FirstOrderProbe, ISTOptimizer, Suppressor

from ..benchkit.data import random_batch, shakespeare_bytes
from ..benchkit.models import llama_config, random_llama, shape_parser
from ..benchkit.report import spearman


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.base_model.model.model.layers)


def agreement(model: torch.nn.Module, batch: dict, lambdas: list[float]) -> dict[float, tuple]:
    blocks = blocks_of(model)
    model.eval()
    probe = FirstOrderProbe(blocks, "adapters")
    try:
        base = model(**batch).loss
        base.backward()
        probe.end_step()
        sums, _ = probe.take()
    finally:
        probe.remove()
        model.zero_grad(set_to_none=True)
    result = {}
    with torch.no_grad():
        for lam in lambdas:
            measured = []
            for i in range(len(blocks)):
                with Suppressor(blocks, lam, "adapters").suppress([i]):
                    measured.append(float(model(**batch).loss) - float(base))
            predicted = (lam - 1.0) * sums
            result[lam] = (spearman(torch.tensor(measured), predicted), measured,
                           predicted.tolist())
    model.train()
    return result


def run_agreement(args: argparse.Namespace, tokens: torch.Tensor) -> None:
    model = random_llama(llama_config(args.layers, args.hidden), lora_rank=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    gen = torch.Generator().manual_seed(1)
    probe_batch = random_batch(tokens, args.batch * 2, args.seq, torch.Generator().manual_seed(99))
    print("| training steps | loss | Spearman, lambda=0.25 | Spearman, lambda=0.9 |")
    print("| --- | --- | --- | --- |")
    done = 0
    for stage in args.stages:
        while done < stage:
            model(**random_batch(tokens, args.batch, args.seq, gen)).loss.backward()
            opt.step()
            opt.zero_grad()
            done += 1
        with torch.no_grad():
            loss = float(model(**probe_batch).loss)
        res = agreement(model, probe_batch, [0.25, 0.9])
        print(f"| {stage} | {loss:.3f} | {res[0.25][0]:+.2f} | {res[0.9][0]:+.2f} |")
        if args.verbose:
            for lam, (_, measured, predicted) in res.items():
                print(f"  lambda={lam}: measured {[f'{x:.2e}' for x in measured]}")
                print(f"  lambda={lam}: predicted {[f'{x:.2e}' for x in predicted]}")


def run_cost(args: argparse.Namespace, tokens: torch.Tensor) -> None:
    configs = {}
    for name, kwargs in (("no rounds", {"update_interval": 10**9}),
                         ("first-order hooks, no rounds", {"estimator": "first-order",
                                                           "update_interval": 10**9}),
                         ("first-order, T=10", {"estimator": "first-order"}),
                         ("paper, T=10", {"estimator": "paper"})):
        model = random_llama(llama_config(args.layers, args.hidden), lora_rank=8)
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=args.lr, active_layers=1.0, seed=0,
                           **kwargs)
        configs[name] = {"model": model, "opt": opt, "times": []}
    gen = torch.Generator().manual_seed(2)
    warmup = 2
    for step in range(warmup + args.timed_steps):
        batch = random_batch(tokens, args.batch, args.seq, gen)
        names = list(configs)
        for name in names[step % len(names):] + names[: step % len(names)]:  # rotate order
            cfg = configs[name]
            start = time.perf_counter()
            cfg["model"](**batch).loss.backward()
            cfg["opt"].step()
            cfg["opt"].zero_grad()
            if step >= warmup:
                cfg["times"].append(time.perf_counter() - start)
    base_median = statistics.median(configs["no rounds"]["times"])
    base_mean = statistics.mean(configs["no rounds"]["times"])
    print("| estimator | median step (ms) | median vs no rounds | mean step (ms) "
          "| mean vs no rounds |")
    print("| --- | --- | --- | --- | --- |")
    for name, cfg in configs.items():
        median, mean = statistics.median(cfg["times"]), statistics.mean(cfg["times"])
        print(f"| {name} | {1000 * median:.1f} | {median / base_median:.3f} | "
              f"{1000 * mean:.1f} | {mean / base_mean:.3f} |")


class TimedProbe(FirstOrderProbe):
    """The probe, with the wall time spent inside its hooks and ``end_step`` summed."""

    spent = 0.0

    def _timed(self, method, *args):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        method(*args)
        self.spent += time.perf_counter() - start

    def _add(self, *args) -> None:  # noqa: ANN002
        self._timed(super()._add, *args)

    def _adapter_hook(self, *args) -> None:  # noqa: ANN002
        self._timed(super()._adapter_hook, *args)

    def end_step(self) -> None:
        self._timed(super().end_step)


def run_paired_hook_cost(args: argparse.Namespace, tokens: torch.Tensor) -> None:
    """Same model (lr 0, so every step does the same work), same batch, steps with and
    without the probe's hooks alternating: the median of the per-pair time ratios."""
    model = random_llama(llama_config(args.layers, args.hidden), lora_rank=8)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.0, active_layers=1.0,
                       update_interval=10**9, seed=0)
    gen = torch.Generator().manual_seed(3)
    ratios, plain_times, inside = [], [], []
    for pair in range(2 + args.timed_steps):
        batch = random_batch(tokens, args.batch, args.seq, gen)
        times = {}
        for hooked in ((False, True) if pair % 2 else (True, False)):
            probe = TimedProbe(blocks_of(model), "adapters") if hooked else None
            start = time.perf_counter()
            model(**batch).loss.backward()
            if probe is not None:
                probe.end_step()
            opt.step()
            opt.zero_grad()
            times[hooked] = time.perf_counter() - start
            if probe is not None:
                probe.remove()
                if pair >= 2:
                    inside.append(probe.spent / times[True])
        if pair >= 2:
            ratios.append(times[True] / times[False])
            plain_times.append(times[False])
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"Paired hook cost over {len(ratios)} pairs (step without hooks: median "
          f"{1000 * statistics.median(plain_times):.1f} ms): with/without ratio median "
          f"{statistics.median(ratios):.4f}, quartiles {quartiles[0]:.4f} .. {quartiles[2]:.4f}; "
          f"time inside the hooks and end_step: median {100 * statistics.median(inside):.2f}% "
          "of the hooked step")


def main() -> None:
    parser = shape_parser(__doc__, layers=8, batch=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[5, 20, 60])
    parser.add_argument("--timed-steps", type=int, default=20)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    tokens = shakespeare_bytes()
    print(f"Llama {args.layers} layers x hidden {args.hidden}, LoRA r8 on q,k,v,up,down, "
          f"batch {args.batch} x seq {args.seq}, torch threads {torch.get_num_threads()}")
    run_agreement(args, tokens)
    if not args.skip_cost:
        run_cost(args, tokens)
        run_paired_hook_cost(args, tokens)


if __name__ == "__main__":
    main()
