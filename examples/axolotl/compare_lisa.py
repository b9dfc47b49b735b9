"""axolotl's LISA (``lisa_n_layers``) vs the IST plugin, same layers per step, same config.

Each method runs in its own process (axolotl's plugin registry is process-wide) on the
trainer, model and optimizer that axolotl builds from the YAML (``load_cfg``,
``load_datasets``, ``setup_model_and_trainer``: for IST the plugin has installed the
ISTOptimizer; for LISA the optimizer is the one ``trainer.create_optimizer()`` builds and
LISA's callback is in the trainer). One step is ``trainer.training_step`` on one micro-batch
(forward and backward), then ``optimizer.step()`` and ``zero_grad(set_to_none=True)``;
LISA's layer switch runs before each step, as its ``on_step_begin`` does with
``lisa_step_interval: 1``. The first ``--accounted`` steps run under
``ist_optim.account_step`` (peak bytes of tensor storage on the device during the step,
split into weights, gradients, optimizer state, activations and transients, plus the
optimizer state held in host memory), the next ``--timed`` steps are timed without it.

    python examples/axolotl/compare_lisa.py --out examples/axolotl/outputs/lisa-vs-ist

(run with the axolotl environment's python after ``python examples/axolotl/prepare.py``.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = {"lisa": HERE / "smollm2-full-lisa.yml", "ist": HERE / "smollm2-full-ist.yml"}
MIB = 2**20


def _state_bytes(optimizer: Any) -> int:
    from ist_optim import ISTOptimizer, state_bytes

    if isinstance(optimizer, ISTOptimizer):
        return int(optimizer.memory_report()["state_bytes_on_device"])
    return int(state_bytes(optimizer.state.values()))


def measure(config: Path, accounted: int, timed: int) -> dict[str, Any]:
    """Build axolotl's trainer from ``config`` and measure ``accounted + timed`` steps."""
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import setup_model_and_trainer

    from ist_optim import account_step

    cfg = load_cfg(str(config))
    trainer, model, *_ = setup_model_and_trainer(cfg, load_datasets(cfg=cfg))
    optimizer = trainer.optimizer if trainer.optimizer is not None else trainer.create_optimizer()
    lisa = [cb for cb in trainer.callback_handler.callbacks
            if type(cb).__name__ == "LISACallback"]
    batches = iter(trainer.get_train_dataloader())
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # what the Trainer's loop sets

    def one_step(batch: Any) -> None:
        if lisa:
            lisa[0].switch_active_layers()
        trainer.training_step(model, batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows = []
    for step in range(1, accounted + 1):
        batch = next(batches)
        account = account_step(lambda b=batch: one_step(b), model=model, optimizer=optimizer)
        rows.append({"step": step, "peak_bytes": account.peak_bytes,
                     "breakdown": account.breakdown,
                     "host_optimizer_state_bytes": account.host_optimizer_state_bytes,
                     "state_bytes_on_device": _state_bytes(optimizer)})
    seconds, timed_state = [], []
    for _ in range(timed):
        batch = next(batches)
        start = time.perf_counter()
        one_step(batch)
        seconds.append(time.perf_counter() - start)
        timed_state.append(_state_bytes(optimizer))
    trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return {"config": str(config), "optimizer": type(optimizer).__name__,
            "trainable_params": trainable, "steps": rows, "step_seconds": seconds,
            "timed_state_bytes_on_device": timed_state,
            "final_state_bytes_on_device": _state_bytes(optimizer)}


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: per accounted step, each method's device optimizer state and peak (MiB)."""
    names = list(results)
    head = "| step | " + " | ".join(
        f"{n}: optimizer state on device | {n}: accounted peak" for n in names) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(names))]
    for i, _ in enumerate(results[names[0]]["steps"]):
        cells = []
        for n in names:
            row = results[n]["steps"][i]
            cells += [f"{row['breakdown']['optimizer_state'] / MIB:.1f}",
                      f"{row['peak_bytes'] / MIB:.1f}"]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines.append("")
    for n in names:
        states = [row["state_bytes_on_device"] for row in results[n]["steps"]]
        states += results[n]["timed_state_bytes_on_device"]
        marks = sorted({1, len(states) // 4, len(states) // 2, len(states)} - {0})
        lines.append(f"* {n}: optimizer state on the device after step " + ", ".join(
            f"{k}: {states[k - 1] / MIB:.1f} MiB" for k in marks)
            + f" (full AdamW state of the {results[n]['trainable_params']:,} trainable "
            f"parameters: {8 * results[n]['trainable_params'] / MIB:.1f} MiB)")
    for n in names:
        secs = results[n]["step_seconds"]
        last = results[n]["steps"][-1]
        lines.append(
            f"* {n}: {results[n]['optimizer']}, step time median {statistics.median(secs):.2f} s "
            f"over {len(secs)} steps; last accounted step: peak {last['peak_bytes'] / MIB:.1f} "
            f"MiB = " + ", ".join(f"{k} {v / MIB:.1f}" for k, v in last["breakdown"].items())
            + f"; optimizer state in host memory {last['host_optimizer_state_bytes'] / MIB:.1f} "
            "MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "outputs" / "lisa-vs-ist")
    parser.add_argument("--accounted", type=int, default=8)
    parser.add_argument("--timed", type=int, default=8)
    parser.add_argument("--method", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.method:  # the child process: one method
        result = measure(CONFIGS[args.method], args.accounted, args.timed)
        (args.out / f"{args.method}.json").write_text(json.dumps(result, indent=1))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1"}
    results = {}
    for method in CONFIGS:
        subprocess.run([sys.executable, __file__, "--method", method, "--out", str(args.out),
                        "--accounted", str(args.accounted), "--timed", str(args.timed)],
                       check=True, env=env)
        results[method] = json.loads((args.out / f"{method}.json").read_text())
    report = table(results)
    (args.out / "table.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
