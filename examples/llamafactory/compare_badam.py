"""LLaMA-Factory's own BAdam (``use_badam: true``) vs IST (``ist-llamafactory``), side by side.

Both methods run full fine-tuning of the same model on the same data with LLaMA-Factory's
trainer (``stage: pt``, the same seed, batch, learning rate, schedule and steps), each in
its own process: BAdam through ``run_exp`` with ``use_badam: true`` (``badam_mode: layer``,
one block at a time, the next every ``--switch`` steps, ascending), IST through
:func:`ist_optim.integrations.llamafactory.ist_trainers` (``ist_active_layers: 1``,
``ist_sampling: uniform``, ``ist_state_policy: offload``). A callback measures every step
from ``on_step_begin`` to ``on_step_end`` (forward, backward, optimizer step): the peak of
live tensor storage on the device (:class:`ist_optim.planner.tracker.LiveMemory`, the
accounting ``account_step`` uses, with the weights, gradients and optimizer state alive at
the start counted), the optimizer state on the device at the end of the step (BAdam's at
the end of its inner optimizer's step, before its block switch empties it), and the wall
and CPU seconds; the training loss comes from the logs.

    python examples/llamafactory/compare_badam.py --model DIR --data FILE.jsonl \\
        --out examples/llamafactory/outputs/badam-vs-ist

(run with the LLaMA-Factory environment's python, ``bash scripts/test-llamafactory.sh``
builds it; ``badam`` installed there; ``--data`` holds ``{"text": ...}`` records, e.g. the
Shakespeare file of ``python examples/axolotl/prepare.py``.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MIB = 2**20
METHODS = ("badam", "ist")


def _config(method: str, args: argparse.Namespace, out: Path, data_dir: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_name_or_path": str(args.model), "stage": "pt", "do_train": True,
        "finetuning_type": "full", "dataset": "text", "dataset_dir": str(data_dir),
        "cutoff_len": args.seq_len, "overwrite_cache": True, "output_dir": str(out),
        "logging_steps": 1, "save_strategy": "no", "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
        "learning_rate": args.lr, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1,
        "weight_decay": 0.0, "bf16": False, "report_to": "none", "seed": 0,
        "disable_tqdm": True, "max_samples": args.max_samples,
        "val_size": args.val_size, "eval_strategy": "steps", "eval_steps": args.steps,
        "eval_on_start": True, "per_device_eval_batch_size": args.batch_size,
    }
    if method == "badam":
        cfg.update(use_badam=True, badam_mode="layer", badam_switch_mode="ascending",
                   badam_switch_interval=args.switch, badam_verbose=0)
    return cfg


class Measure:
    """A ``TrainerCallback`` (built lazily: transformers is imported in the child only)."""

    @staticmethod
    def build(rows: list[dict[str, Any]], losses: dict[int, float]) -> Any:
        import torch
        from transformers import TrainerCallback

        from ist_optim import ISTOptimizer, state_bytes
        from ist_optim.integrations import unwrap_ist_optimizer
        from ist_optim.memory import LiveMemory

        def innermost(optimizer: Any) -> Any:
            """Inside accelerate's wrapper and BAdam's BlockOptimizer (``base_optimizer``)."""
            inner = optimizer
            while True:
                nested = getattr(inner, "optimizer", None) or getattr(inner, "base_optimizer",
                                                                      None)
                if nested is None or nested is inner or isinstance(inner, ISTOptimizer):
                    return inner
                inner = nested

        held: dict[str, int] = {}

        def record_held(inner: Any, *_: Any) -> None:
            held["bytes"] = int(state_bytes(inner.state.values()))

        def device_state(optimizer: Any) -> int:
            """IST: its report after the step. BAdam: the state at the end of the inner
            optimizer's step, before BAdam's block switch empties it (a post-step hook)."""
            try:
                ist: ISTOptimizer = unwrap_ist_optimizer(optimizer)
            except TypeError:
                return held.pop("bytes", 0)
            return int(ist.memory_report()["state_bytes_on_device"])

        class _Measure(TrainerCallback):
            hooked: Any = None

            def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                              optimizer: Any = None, **kwargs: Any) -> None:
                if self.hooked is None and not isinstance(innermost(optimizer), ISTOptimizer):
                    self.hooked = innermost(optimizer).register_step_post_hook(record_held)
                existing = [*model.parameters(), *model.buffers(),
                            *(p.grad for p in model.parameters() if p.grad is not None)]
                inner = innermost(optimizer)
                if isinstance(inner, ISTOptimizer):
                    inner = inner.optimizer
                for value in inner.state.values():
                    existing += [t for t in value.values() if isinstance(t, torch.Tensor)]
                self.live = LiveMemory("cpu", existing=existing)
                self.live.__enter__()
                self.start = (time.perf_counter(), time.process_time())

            def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                            optimizer: Any = None, **kwargs: Any) -> None:
                wall, cpu = time.perf_counter(), time.process_time()
                self.live.__exit__(None, None, None)
                rows.append({"step": state.global_step, "peak_bytes": self.live.peak_bytes,
                             "state_bytes_on_device": device_state(optimizer),
                             "wall_seconds": wall - self.start[0],
                             "cpu_seconds": cpu - self.start[1]})

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                       **kwargs: Any) -> None:
                if logs and "eval_loss" in logs:
                    losses[state.global_step] = float(logs["eval_loss"])

        return _Measure()


def run_one(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train ``method`` in this process; returns its per-step rows and losses."""
    from llamafactory.train.tuner import run_exp

    from ist_optim.integrations.llamafactory import ist_trainers

    data_dir = Path(tempfile.mkdtemp(prefix="badam-vs-ist-data."))
    (data_dir / "text.jsonl").write_text(Path(args.data).read_text(encoding="utf-8"),
                                         encoding="utf-8")
    (data_dir / "dataset_info.json").write_text(json.dumps(
        {"text": {"file_name": "text.jsonl", "columns": {"prompt": "text"}}}))
    out = Path(tempfile.mkdtemp(prefix=f"badam-vs-ist-{method}."))
    rows: list[dict[str, Any]] = []
    losses: dict[int, float] = {}
    callbacks = [Measure.build(rows, losses)]
    cfg = _config(method, args, out, data_dir)
    if method == "ist":
        options = {"active_layers": 1, "sampling": "uniform", "state_policy": "offload",
                   "seed": 0}
        with ist_trainers(options):
            run_exp(args=cfg, callbacks=callbacks)
    else:
        run_exp(args=cfg, callbacks=callbacks)
    return {"method": method, "config": cfg, "rows": rows,
            "losses": {str(k): v for k, v in sorted(losses.items())}}


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: per method, the peak, device optimizer state, step time and the held-out
    loss before the first step and after the last."""
    lines = ["| method | peak of a step (MiB, max) | optimizer state on the device at the "
             "end of a step (MiB, max) | step wall s (median) | step CPU s (median) | held-out "
             "loss before / after |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, result in results.items():
        rows, losses = result["rows"], list(result["losses"].values())
        lines.append(
            f"| {name} | {max(r['peak_bytes'] for r in rows) / MIB:.1f} | "
            f"{max(r['state_bytes_on_device'] for r in rows) / MIB:.1f} | "
            f"{statistics.median(r['wall_seconds'] for r in rows):.2f} | "
            f"{statistics.median(r['cpu_seconds'] for r in rows):.2f} | "
            f"{losses[0]:.4f} / {losses[-1]:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=HERE / "outputs" / "badam-vs-ist")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--switch", type=int, default=1, help="BAdam's switch interval")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--max-samples", type=int, default=256)
    parser.add_argument("--val-size", type=int, default=32, help="held-out records")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.method:  # the child process: one method
        result = run_one(args.method, args)
        (args.out / f"{args.method}.json").write_text(json.dumps(result, indent=1))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DISABLE_VERSION_CHECK": "1", "WANDB_MODE": "disabled"}
    results = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--method", method, *(argv or sys.argv[1:])]
        subprocess.run(command, env=env, check=True)
        results[method] = json.loads((args.out / f"{method}.json").read_text())
    text = table(results)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
