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

from ..history import ImportanceHistory
from ..optimizer import ISTOptimizer
from .errors import CLIError

__all__ = [
    "OPTIMIZER_KINDS",
    "EvalPoint",
    "RunResult",
    "active_description",
    "build_optimizer",
    "evaluate",
    "optimizer_state_bytes",
    "train",
]

OPTIMIZER_KINDS = ("adamw", "ist", "badam")
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


def active_description(optimizer: torch.optim.Optimizer) -> str:
    """Which layers train in the coming step, for the progress bar."""
    if isinstance(optimizer, ISTOptimizer):
        return ",".join(str(i) for i in optimizer.active_layers)
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
) -> RunResult:
    """Train ``steps`` steps; evaluate before, every ``eval_every`` steps, and at the end.

    Evaluation time is not counted in ``RunResult.step_seconds``. IST runs record an
    :class:`ist_optim.ImportanceHistory`.
    """
    from tqdm.auto import tqdm

    result = RunResult()
    ist = optimizer if isinstance(optimizer, ISTOptimizer) else None
    if ist is not None:
        result.history = ImportanceHistory(num_layers=ist.num_layers)
    if val_batches:
        result.evals.append(EvalPoint(0, 0.0, evaluate(model, val_batches, progress=progress)))
    model.train()
    bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for step in range(1, steps + 1):
            batch = next(batches)
            trained = ist.active_layers if ist is not None else None
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = model(**batch).loss
            loss.backward()
            if max_grad_norm is not None:
                with_grad = [p for p in model.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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
    finally:
        bar.close()
    result.state_bytes = optimizer_state_bytes(optimizer)
    if ist is not None:
        ist.close()
    return result
