"""One training run of a named method, from a prepared data/model context.

Shared by the single run of ``ist-finetune``, its ``--compare`` mode and
``benchmarks/quality.py``: each run loads a fresh copy of the base model, adds the adapters
with the run's seed, trains on the same block order (seeded the same) and measures held-out
loss, time, optimizer state and peak memory.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..memory import PeakMemory
from .data import TokenSplit, block_batches, load_documents, split_documents, tokenize_split
from .errors import CLIError
from .models import add_adapters, load_model, load_tokenizer
from .train import RunResult, build_optimizer, build_scheduler, train

if TYPE_CHECKING:
    from .checkpoints import CheckpointOptions

__all__ = ["DEFAULT_LR", "MethodSpec", "MethodRun", "RunContext", "prepare_context",
           "run_method"]

DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "rslora": 1e-3, "ia3": 3e-3, "full": 2e-5}


@dataclass(frozen=True)
class MethodSpec:
    """A way to fine-tune: what trains (``peft``), how (``optimizer``), IST keywords.

    Example:
        >>> MethodSpec("lora+uniform", "lora", "ist", {"sampling": "uniform"}).learning_rate
        0.001
    """

    name: str
    peft: str
    optimizer: str
    ist_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.peft, 1e-3)


@dataclass
class RunContext:
    """Everything runs share: the model to load, the tokens and the batch shapes."""

    model_name: str
    tokens: TokenSplit
    seq_len: int
    batch_size: int
    eval_batches: int = 8
    rank: int = 8
    alpha: float | None = None
    target_modules: list[str] | str = "all-linear"
    device: str = "cpu"
    badam_switch_every: int = 10
    progress: bool = True
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    quantize: str = "none"

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        batches = list(block_batches(self.tokens.val, self.seq_len, self.batch_size,
                                     max_batches=self.eval_batches))
        return [{k: v.to(self.device) for k, v in b.items()} for b in batches]


def prepare_context(model_name: str, data: str, *, val_fraction: float, seq_len: int,
                    batch_size: int, **kwargs: Any) -> RunContext:
    """Read and split the data, tokenize it with the model's tokenizer, check it is enough.

    Raises:
        CLIError: when either side holds less than one batch of blocks.
    """
    docs = load_documents(data)
    train_texts, val_texts = split_documents(docs, val_fraction)
    tokens = tokenize_split(load_tokenizer(model_name), train_texts, val_texts)
    context = RunContext(model_name, tokens, seq_len, batch_size, **kwargs)
    for side, stream in (("training", tokens.train), ("held-out", tokens.val)):
        if stream.numel() // seq_len < batch_size:
            raise CLIError(
                f"--data {data}: the {side} part has {stream.numel()} tokens, fewer than one "
                f"batch of --batch-size {batch_size} x --seq-len {seq_len}; give more text or "
                "lower them"
            )
    return context


@dataclass
class MethodRun:
    """A finished run: the trained model, what it measured, and the peak memory."""

    spec: MethodSpec
    seed: int
    model: Any
    result: RunResult
    peak_bytes: int
    memory_kind: str
    layer_names: list[str] | None = None
    sampling_spread: dict[str, float] | None = None

    @property
    def val_before(self) -> float:
        return self.result.evals[0].val_loss if self.result.evals else math.nan

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers of this run."""
        r = self.result
        return {
            "method": self.spec.name, "peft": self.spec.peft,
            "optimizer": self.spec.optimizer, "ist_kwargs": self.spec.ist_kwargs,
            "lr": self.spec.learning_rate, "seed": self.seed, "steps": len(r.step_seconds),
            "val_loss_before": self.val_before, "val_loss_after": r.final_val_loss,
            "train_seconds": r.train_seconds,
            "seconds_per_step": r.train_seconds / max(1, len(r.step_seconds)),
            "train_cpu_seconds": r.train_cpu_seconds,
            "cpu_seconds_per_step": r.train_cpu_seconds / max(1, len(r.step_seconds)),
            "optimizer_state_bytes": r.state_bytes, "peak_bytes": self.peak_bytes,
            "memory_kind": self.memory_kind,
            "evals": [[e.step, e.train_seconds, e.val_loss, e.train_cpu_seconds]
                      for e in r.evals],
            "train_losses": r.train_losses,
            "sampling_spread": self.sampling_spread,
        }


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: str) -> Iterator[None]:
    """Inside: the global torch RNG (CPU and ``device``) seeded with ``seed``, so dropout
    is reproducible from ``--seed``; on exit the caller's RNG states are restored."""
    devices = []
    if torch.device(device).type == "cuda":
        index = torch.device(device).index
        devices = [torch.cuda.current_device() if index is None else index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def run_method(spec: MethodSpec, context: RunContext, *, steps: int, seed: int,
               eval_every: int = 0,
               checkpoints: CheckpointOptions | None = None) -> MethodRun:
    """Train a fresh copy of the base model with ``spec`` for ``steps`` steps.

    The global torch RNG is seeded with ``seed`` for the run (dropout) and restored after.

    Args:
        checkpoints: write checkpoints and/or resume from the newest one
            (:mod:`ist_optim.cli.checkpoints`); ``None``: neither.
    """
    gc.collect()
    meter = PeakMemory(context.device)
    meter.reset()
    with seeded_global_rng(seed, context.device):
        quantized = context.quantize != "none"
        if quantized and spec.peft == "full":
            raise CLIError(f"--quantize {context.quantize} freezes the base weights: use an "
                           "adapter (--peft lora, dora, rslora, ia3), not --peft full")
        model = load_model(context.model_name, quantize=context.quantize,
                           device=context.device if quantized else None)
        model = add_adapters(model, spec.peft, rank=context.rank, alpha=context.alpha,
                             target_modules=context.target_modules, seed=seed)
        if not quantized:  # a 4-bit model was loaded where it trains
            model.to(context.device)
        optimizer = build_optimizer(spec.optimizer, model, lr=spec.learning_rate, seed=seed,
                                    ist_kwargs=spec.ist_kwargs,
                                    badam_switch_every=context.badam_switch_every)
        scheduler = build_scheduler(optimizer, context.lr_schedule,
                                    warmup_steps=context.warmup_steps, total_steps=steps)
        layer_names = getattr(optimizer, "layer_names", None)
        generator = torch.Generator().manual_seed(seed)
        batches = ({k: v.to(context.device) for k, v in b.items()}
                   for b in block_batches(context.tokens.train, context.seq_len,
                                          context.batch_size, generator=generator))
        resume, after_step = None, None
        if checkpoints is not None:
            from .checkpoints import resume_run, step_saver

            def skip(count: int) -> None:
                for _ in range(count):
                    next(batches)

            resume = resume_run(checkpoints, model=model, optimizer=optimizer,
                                scheduler=scheduler, skip_batches=skip)
            after_step = step_saver(checkpoints, model=model, optimizer=optimizer,
                                    scheduler=scheduler)
        result = train(model, optimizer, batches, steps, val_batches=context.val_batches(),
                       eval_every=eval_every, progress=context.progress, desc=spec.name,
                       scheduler=scheduler, resume=resume, after_step=after_step)
    spread_of = getattr(optimizer, "sampling_spread", None)
    spread = spread_of() if callable(spread_of) else None
    return MethodRun(spec, seed, model, result, meter.peak_bytes(), meter.kind, layer_names,
                     spread)
