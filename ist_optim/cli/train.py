"""The training loop shared by ``ist-finetune``, ``--compare`` and ``benchmarks/quality.py``.

One loop for every optimizer kind: plain AdamW over all trainable parameters (``"adamw"``),
:class:`ist_optim.ISTOptimizer` around AdamW (``"ist"``), and BAdam's ``BlockOptimizer``
(``"badam"``, block-wise training, ``pip install badam``).
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import ImportanceHistory, ISTOptimizer
from .errors import CLIError

__all__ = [
    "LR_SCHEDULES",
    "OPTIMIZER_KINDS",
    "EvalPoint",
    "RunResult",
    "active_description",
    "build_optimizer",
    "build_scheduler",
    "device_synchronizer",
    "evaluate",
    "optimizer_state_bytes",
    "train",
]

OPTIMIZER_KINDS = ("adamw", "ist", "badam")
LR_SCHEDULES = ("constant", "linear", "cosine")
Batch = dict[str, torch.Tensor]


def build_optimizer(
    kind: str,
    model: nn.Module,
    *,
    lr: float,
    seed: int,
    ist_kwargs: dict[str, Any] | None = None,
    badam_switch_every: int = 10,
) -> torch.optim.Optimizer:
    """The optimizer of ``kind`` over the trainable parameters of ``model``.

    Args:
        kind: ``"adamw"``, ``"ist"`` or ``"badam"``.
        model: the model to train (its ``requires_grad`` flags select the parameters).
        lr: learning rate; weight decay is 0 for all kinds.
        seed: seed of IST's private generator.
        ist_kwargs: extra :class:`ist_optim.ISTOptimizer` keywords (``active_layers``,
            ``sampling``, ...); only for ``"ist"``.
        badam_switch_every: steps between BAdam block switches (blocks in descending order,
            BAdam's default, which needs no global RNG).

    Raises:
        CLIError: for an unknown kind, IST keywords given to another kind, a value
            ISTOptimizer rejects, or BAdam not installed.
    """
    ist_kwargs = dict(ist_kwargs or {})
    if kind not in OPTIMIZER_KINDS:
        raise CLIError(f"--optimizer {kind}: unknown; choose one of {', '.join(OPTIMIZER_KINDS)}")
    if ist_kwargs and kind != "ist":
        raise CLIError(f"IST options {sorted(ist_kwargs)} given to optimizer {kind!r}; "
                       "they apply only to 'ist'")
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if kind == "ist":
        try:
            return ISTOptimizer(torch.optim.AdamW, model, lr=lr, weight_decay=0.0, seed=seed,
                                **ist_kwargs)
        except (ValueError, TypeError) as err:
            raise CLIError(f"IST option rejected: {err}") from err
    try:
        from badam import BlockOptimizer
    except ImportError as err:
        raise CLIError("optimizer 'badam' needs the package badam: pip install badam") from err
    if badam_switch_every < 1:
        raise CLIError(f"--badam-switch-every {badam_switch_every}: must be at least 1")
    base = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with _quiet():
        optimizer = BlockOptimizer(base, named, switch_block_every=badam_switch_every,
                                   switch_mode="descending", verbose=0)
    step = optimizer.step

    def quiet_step(*args: Any, **kwargs: Any) -> Any:
        with _quiet():  # BAdam prints every block switch to stdout
            return step(*args, **kwargs)

    optimizer.step = quiet_step  # type: ignore[method-assign]
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, *, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The learning-rate schedule of ``--lr-schedule``, stepped once per optimizer step:
    ``transformers.get_scheduler``'s, the HF Trainer's own.

    The factor rises linearly from 0 over ``warmup_steps``, then stays at 1
    (``"constant"``: ``constant_with_warmup``), falls linearly to 0 at ``total_steps``
    (``"linear"``) or along a half cosine to 0 (``"cosine"``). ``"constant"`` without
    warm-up returns ``None`` (no scheduler: the learning rate is never touched).

    Raises:
        CLIError: for an unknown kind or a negative warm-up.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = torch.optim.SGD([p], lr=1.0)
        >>> sched = build_scheduler(opt, "linear", warmup_steps=2, total_steps=4)
        >>> lrs = []
        >>> for _ in range(4):
        ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
        >>> lrs
        [0.0, 0.5, 1.0, 0.5]
    """
    if kind not in LR_SCHEDULES:
        raise CLIError(f"--lr-schedule {kind}: unknown; choose one of {', '.join(LR_SCHEDULES)}")
    if warmup_steps < 0:
        raise CLIError(f"--warmup-steps {warmup_steps}: must be at least 0")
    if kind == "constant" and warmup_steps == 0:
        return None
    from transformers import get_scheduler

    name = "constant_with_warmup" if kind == "constant" else kind
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                         num_training_steps=total_steps)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer holds: its ``state`` (for BAdam, the base
    optimizer's state plus its fp32 copies of the active block).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(10))
        >>> opt = torch.optim.AdamW([p])
        >>> p.grad = torch.ones(10); opt.step()
        >>> optimizer_state_bytes(opt)  # exp_avg + exp_avg_sq (40 B each) + step (4 B)
        84
    """
    inner = getattr(optimizer, "base_optimizer", optimizer)
    tensors = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    tensors += list(getattr(optimizer, "param_idx2hp", {}).values())
    return sum(t.numel() * t.element_size() for t in tensors)


#: The progress bar lists the active layers only up to this many; beyond, their count.
LISTED_LAYERS = 4


def active_description(optimizer: torch.optim.Optimizer) -> str:
    """Which layers train in the coming step, for the progress bar: ``"3/30: 4,17,22"``
    (count of the layers, and the set while it is small), ``"30/30"`` in a dense phase.

    Example:
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(8))
        >>> opt = ISTOptimizer(torch.optim.SGD, torch.nn.Sequential(*blocks), lr=0.1,
        ...                    layers=list(blocks), sampling="uniform", seed=0)
        >>> active_description(opt)
        '2/8: 6,7'
        >>> opt.set_active_layers(range(8)); active_description(opt)
        '8/8'
    """
    if isinstance(optimizer, ISTOptimizer):
        active = optimizer.active_layers
        count = f"{len(active)}/{optimizer.num_layers}"
        if len(active) > LISTED_LAYERS:
            return count
        return f"{count}: " + ",".join(str(i) for i in active)
    prefixes = getattr(optimizer, "active_param_prefixs", None)
    if prefixes:
        return ",".join(p.rstrip(".").rsplit(".", 1)[-1] for p in prefixes)
    return "all"


def evaluate(model: nn.Module, batches: Sequence[Batch], *, progress: bool = False) -> float:
    """Mean loss of ``model`` over ``batches`` (eval mode, no grad; train mode restored)."""
    from tqdm.auto import tqdm

    if not batches:
        raise CLIError("no validation batch: give more held-out text or lower --batch-size")
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="held-out loss", leave=False,
                              disable=not progress, dynamic_ncols=True):
                total += float(model(**batch).loss)
    finally:
        model.train(was_training)
    return total / len(batches)


@dataclass
class EvalPoint:
    """Held-out loss after ``step`` steps, ``train_seconds`` of training (wall) time and
    ``train_cpu_seconds`` of the process's CPU time spent in those steps."""

    step: int
    train_seconds: float
    val_loss: float
    train_cpu_seconds: float = 0.0


@dataclass
class RunResult:
    """What one training run measured."""

    train_losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    state_bytes: int = 0
    history: ImportanceHistory | None = None

    @property
    def train_seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def train_cpu_seconds(self) -> float:
        """Process CPU time of the training steps (all threads): on a shared machine a
        steadier measure of compute than wall time."""
        return sum(self.step_cpu_seconds)

    @property
    def final_val_loss(self) -> float:
        return self.evals[-1].val_loss if self.evals else math.nan

    def to_state(self) -> dict[str, Any]:
        """What a resumed run needs of this record, in plain types (see
        :mod:`ist_optim.cli.checkpoints`); ``state_bytes`` is measured at the end."""
        return {
            "train_losses": list(self.train_losses),
            "step_seconds": list(self.step_seconds),
            "step_cpu_seconds": list(self.step_cpu_seconds),
            "evals": [[e.step, e.train_seconds, e.val_loss, e.train_cpu_seconds]
                      for e in self.evals],
            "history": None if self.history is None else self.history.to_dict(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunResult:
        """The record :meth:`to_state` saved.

        Example:
            >>> r = RunResult(train_losses=[1.5], step_seconds=[0.1], step_cpu_seconds=[0.2],
            ...               evals=[EvalPoint(0, 0.0, 2.0)])
            >>> RunResult.from_state(r.to_state()) == r
            True
        """
        history = state.get("history")
        return cls(
            train_losses=[float(v) for v in state["train_losses"]],
            step_seconds=[float(v) for v in state["step_seconds"]],
            step_cpu_seconds=[float(v) for v in state["step_cpu_seconds"]],
            evals=[EvalPoint(int(s), float(t), float(v), float(c))
                   for s, t, v, c in state["evals"]],
            history=None if history is None else ImportanceHistory.from_dict(history),
        )


def device_synchronizer(device: torch.device) -> Callable[[], None]:
    """What makes a step's wall time the device's: ``torch.cuda.synchronize(device)`` on
    CUDA (kernels run after their launch returns: without it a step time measures the
    launches, and a step that synchronizes, such as an importance round, looks slower than
    one that does not), nothing elsewhere.

    Example:
        >>> device_synchronizer(torch.device("cpu"))()
    """
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Batch],
    steps: int,
    *,
    val_batches: Sequence[Batch] = (),
    eval_every: int = 0,
    max_grad_norm: float | None = 1.0,
    progress: bool = True,
    desc: str = "train",
    on_step: Callable[[int, float], None] | None = None,
    scheduler: Any = None,
    resume: tuple[int, RunResult] | None = None,
    after_step: Callable[[int, RunResult], None] | None = None,
) -> RunResult:
    """Train ``steps`` steps; evaluate before, every ``eval_every`` steps, and at the end.

    Evaluation time is not counted in ``RunResult.step_seconds``; on CUDA each step's time
    runs from a synchronized device to a synchronized device (:func:`device_synchronizer`).
    IST runs record an :class:`ist_optim.ImportanceHistory`.

    Args:
        scheduler: a learning-rate scheduler stepped after every optimizer step, or ``None``.
        resume: ``(done, result)``: ``done`` steps were trained already (the model, the
            optimizer, the scheduler and ``batches`` are where they were after them) and
            ``result`` is their record, continued in place; no evaluation before.
        after_step: called with the step number and the record at the end of every step,
            after that step's evaluation (``ist-finetune --save-every`` saves there).
    """
    from tqdm.auto import tqdm

    done, result = resume if resume is not None else (0, RunResult())
    if not 0 <= done <= steps:
        raise CLIError(f"the checkpoint is at step {done}, beyond --steps {steps}; "
                       f"pass --steps {done} or more")
    ist = optimizer if isinstance(optimizer, ISTOptimizer) else None
    if ist is not None and result.history is None:
        result.history = ImportanceHistory(num_layers=ist.num_layers)
    if val_batches and resume is None:
        result.evals.append(EvalPoint(0, 0.0, evaluate(model, val_batches, progress=progress)))
    model.train()
    first = next(model.parameters(), None)
    synchronize = device_synchronizer(first.device if first is not None
                                      else torch.device("cpu"))
    bar = tqdm(total=steps, initial=done, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for step in range(done + 1, steps + 1):
            batch = next(batches)
            trained = ist.active_layers if ist is not None else None
            synchronize()  # the batch's copy and earlier work are not this step's
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = model(**batch).loss
            loss.backward()
            if max_grad_norm is not None:
                with_grad = [p for p in model.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize()
            result.step_seconds.append(time.perf_counter() - start)
            result.step_cpu_seconds.append(time.process_time() - start_cpu)
            loss_value = loss.item()
            result.train_losses.append(loss_value)
            if ist is not None and result.history is not None:
                result.history.record(ist, trained)
            bar.set_postfix(loss=f"{loss_value:.3f}", active=active_description(optimizer),
                            refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step, loss_value)
            last = step == steps
            if val_batches and (last or (eval_every > 0 and step % eval_every == 0)):
                val_loss = evaluate(model, val_batches, progress=progress)
                result.evals.append(EvalPoint(step, result.train_seconds, val_loss,
                                              result.train_cpu_seconds))
            if after_step is not None:
                after_step(step, result)
        if val_batches and done == steps and (not result.evals
                                              or result.evals[-1].step != steps):
            result.evals.append(EvalPoint(steps, result.train_seconds,
                                          evaluate(model, val_batches, progress=progress),
                                          result.train_cpu_seconds))
    finally:
        bar.close()
    result.state_bytes = optimizer_state_bytes(optimizer)
    if ist is not None:
        ist.close()
    return result
