"""Importance rounds as strategy objects: measure, average across ranks, update the scores.

Every ``update_interval`` steps :class:`ist_optim.ISTOptimizer` asks its round object to
run; it never asks which class it has: a round says what it needs through
:meth:`ImportanceRound.end_step`, :meth:`ImportanceRound.set_batches` and
:attr:`ImportanceRound.uses_batches`. Each estimator is a class registered by name
(:func:`ist_optim.registry.register_estimator`, see docs/extending.md); the three of
:mod:`ist_optim.importance.estimators` are:

* :class:`PaperRound`: the paper's response suppression (K candidate sets drawn with
  weights ``sigmoid(s)``, one suppressed no-grad forward each, ``A_k = exp(-l_k) - mean``);
* :class:`NormalizedRound`: the same measurements, standardized advantages and
  retained scores;
* :class:`FirstOrderRound`: no forward; the per-layer ``<dL/dy, y>`` read from the training
  backward by a :class:`ist_optim.FirstOrderProbe`.

A round's collective (the ``all_reduce`` that averages measurements over the ranks) always
runs, on every rank, before any rank-local decision to skip the update, so ranks that see
different data (or reach different layers) never mismatch. Non-finite measurements skip
the update on every rank, with one warning per run. :class:`BatchSource` says which batch
a suppression round measures.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ISTConfig, check_int
from ..distributed.ranks import average_across_ranks
from ..registry import estimator, register_estimator
from ..sampling.sampler import LayerSampler
from .batches import BatchCapture, BatchCycler, LossFn, default_loss_fn, move_batch
from .estimators import (
    FirstOrderProbe,
    RunningScale,
    normalized_score_update,
    predicted_suppression_deltas,
)
from .scores import paper_advantages, score_update
from .suppression import Suppressor

__all__ = [
    "BatchSource",
    "FirstOrderRound",
    "ImportanceRound",
    "NormalizedRound",
    "PaperRound",
    "RoundContext",
    "build_round",
    "scalar_loss",
]

logger = logging.getLogger(__name__)


def scalar_loss(value: Any) -> float:
    """The float of a loss returned by ``loss_fn``; a clear error for anything else.

    Example:
        >>> scalar_loss(torch.tensor(2.5)), scalar_loss(1)
        (2.5, 1.0)
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"loss_fn returned a tensor of shape {tuple(value.shape)}; an importance "
                "round needs one scalar loss per batch: reduce it, e.g. return loss.mean()"
            )
        return float(value.detach().reshape(()))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"loss_fn returned a {type(value).__name__}; it must return a scalar loss "
            "(a 0-dim tensor or a number), e.g. model(**batch).loss"
        )
    return float(value)


class BatchSource:
    """The batch of each suppression round: user batches (cycled) or the latest training call.

    Args:
        model: the trained model; without ``batches`` a forward pre-hook on it keeps a
            reference to the arguments of its latest call (no copy).
        batches: a re-iterable of batches (list, DataLoader), cycled; ``None`` to capture.
    """

    def __init__(self, model: nn.Module, batches: Iterable[Any] | None):
        self._cycler = None if batches is None else BatchCycler(batches)
        self._capture = BatchCapture(model) if batches is None else None

    @property
    def captures(self) -> bool:
        """Whether the latest training call is captured (no batches were given)."""
        return self._capture is not None

    @property
    def seen(self) -> int:
        """Batches of the given iterable used so far (0 when capturing)."""
        return self._cycler.seen if self._cycler is not None else 0

    def next(self, device: torch.device, replay_call: bool) -> Any:
        """The next batch, moved to ``device``; ``replay_call``: a captured call is returned
        as it was made (for the default loss), else as what a custom ``loss_fn`` receives."""
        if self._cycler is not None:
            return move_batch(self._cycler.next(), device)
        latest = self._capture.latest if self._capture is not None else None
        if latest is None:
            raise RuntimeError(
                "an importance round is due but the model has not been called since the "
                "optimizer was built, so there is no batch to measure; call the model "
                "before step(), or pass importance_batches="
            )
        return latest if replay_call else latest.as_batch()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Capture nothing while the round's own forwards run."""
        if self._capture is None:
            yield
            return
        self._capture.enabled = False
        try:
            yield
        finally:
            self._capture.enabled = True

    def replace(self, batches: Iterable[Any], seen: int) -> None:
        """Cycle ``batches`` from now on, positioned after ``seen`` of them."""
        if self._cycler is not None:
            raise ValueError(
                "importance batches are already set (importance_batches= or an earlier "
                "set_importance_batches call); build the optimizer without them to set them here"
            )
        cycler = BatchCycler(batches)
        cycler.fast_forward(check_int("batches_seen", seen, 0))
        self.remove()
        self._cycler = cycler

    def fast_forward(self, seen: int) -> None:
        if self._cycler is not None:
            self._cycler.fast_forward(seen)

    def remove(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None


@dataclass(frozen=True)
class RoundContext:
    """What an estimator may need to build its round (see :meth:`ImportanceRound.build`).

    ``blocks`` are the layers' modules; ``suppressor`` damps a set of them (it validated
    every adapter); ``batches``/``loss_fn`` are the user's ``importance_batches`` and
    ``loss_fn``; ``group`` the ranks that average measurements.
    """

    config: ISTConfig
    num_suppressed: int
    group: Any
    model: nn.Module
    blocks: list[nn.Module]
    suppressor: Suppressor
    batches: Iterable[Any] | None
    loss_fn: LossFn | None
    device: torch.device


class ImportanceRound:
    """Base of the round strategies: the shared skip, update and checkpoint logic.

    Subclasses set :attr:`name`, implement :meth:`build`, :meth:`measure` (candidate sets
    and one measurement per set, already averaged across ranks) and :meth:`update` (new
    scores), and are registered with :func:`ist_optim.registry.register_estimator`.
    """

    name: ClassVar[str] = ""
    min_sets = 1
    """Fewer candidate sets than this: no update (the scores keep their values)."""
    uses_batches: ClassVar[bool] = False
    """Whether the round measures batches (``importance_batches``, captured calls)."""

    @classmethod
    def build(cls, context: RoundContext) -> ImportanceRound:
        """The round of this estimator for one optimizer."""
        raise NotImplementedError(f"estimator {cls.name!r} does not define build()")

    def __init__(self, config: ISTConfig, num_suppressed: int, group: Any):
        self.config = config
        self.num_suppressed = num_suppressed
        self.group = group
        self.skipped_rounds = 0
        self._warned_nonfinite = False
        self.last: dict[str, Any] | None = None

    def measure(self, sampler: LayerSampler) -> tuple[list[list[int]], torch.Tensor]:
        raise NotImplementedError

    def update(self, scores: torch.Tensor, sets: list[list[int]],
               losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, sampler: LayerSampler) -> None:
        """Measure and update ``sampler``'s scores (or skip the update, on every rank)."""
        sets, losses = self.measure(sampler)
        if len(sets) < self.min_sets:
            logger.debug("IST round at step %d: %d candidate set(s), no update",
                         sampler.num_steps, len(sets))
            return
        if not torch.isfinite(losses).all():
            self.skipped_rounds += 1
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(
                    f"IST importance round at step {sampler.num_steps} measured a non-finite "
                    f"loss ({losses.tolist()}); the round is skipped and scores are "
                    "unchanged. Further skipped rounds are counted in "
                    "state_dict()['ist'] without warning.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return
        sampler.set_scores(self.update(sampler.scores, sets, losses))
        self.last = {"step": sampler.num_steps, "sets": sets, "losses": losses.tolist()}
        logger.debug("IST round at step %d: sets=%s losses=%s", sampler.num_steps, sets,
                     losses.tolist())

    # checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"estimator": self.name, "skipped_rounds": self.skipped_rounds}

    def check_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("estimator", "paper")
        if saved != self.name:
            raise ValueError(
                f"checkpoint was saved with estimator={saved!r}, this optimizer uses "
                f"estimator={self.name!r}; build it with estimator={saved!r}"
            )
        skipped = state.get("skipped_rounds", 0)
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise ValueError(f"IST checkpoint entry 'skipped_rounds' is {skipped!r}; "
                             "expected an int >= 0")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state)
        self.skipped_rounds = int(state.get("skipped_rounds", 0))

    def remove(self) -> None:
        """Remove any hook this round placed on the model."""

    def end_step(self) -> None:
        """Called once per optimizer step, after the training backward (probes that read
        the backward close the step's measurement here)."""

    def discard_step(self) -> None:
        """Forget what the current step's backward measured (the step is skipped)."""

    def set_batches(self, batches: Iterable[Any], seen: int) -> None:
        """Measure ``batches`` (cycled, after ``seen`` of them) from now on.

        Raises:
            ValueError: for an estimator that runs no estimation forward passes.
        """
        raise ValueError(f"estimator={self.name!r} runs no estimation forward passes, so it "
                         "takes no importance batches")

    def suppressed_losses(self, sets: list[list[int]], batch: Any) -> torch.Tensor:
        """Loss of ``batch`` with each set suppressed; only for suppression estimators.

        Raises:
            ValueError: for an estimator that measures no suppressed losses.
        """
        raise ValueError(f"estimator={self.name!r} measures no suppressed losses")


class SuppressionRound(ImportanceRound):
    """Measures the loss of one batch with each candidate set's responses damped."""

    uses_batches = True

    @classmethod
    def build(cls, context: RoundContext) -> ImportanceRound:
        source = BatchSource(context.model, context.batches)
        return cls(context.config, context.num_suppressed, context.group, context.model,
                   context.suppressor, source, context.loss_fn, context.device)

    def __init__(self, config: ISTConfig, num_suppressed: int, group: Any, model: nn.Module,
                 suppressor: Suppressor, batches: BatchSource, loss_fn: LossFn | None,
                 device: torch.device):
        super().__init__(config, num_suppressed, group)
        self.model = model
        self.device = device
        self.suppressor = suppressor
        self.batches = batches
        self.loss_fn: LossFn = loss_fn or default_loss_fn

    def measure(self, sampler: LayerSampler) -> tuple[list[list[int]], torch.Tensor]:
        batch = self.batches.next(self.device, replay_call=self.loss_fn is default_loss_fn)
        sets = sampler.draw_candidates(self.num_suppressed, self.config.num_candidates)
        losses = self.suppressed_losses(sets, batch)
        return sets, average_across_ranks(losses, self.group)

    def suppressed_losses(self, sets: list[list[int]], batch: Any) -> torch.Tensor:
        """Loss of ``batch`` with each set suppressed (eval mode, no grad); train/eval flags
        and adapter values are restored exactly, also when ``loss_fn`` raises."""
        modes = [(module, module.training) for module in self.model.modules()]
        losses = []
        try:
            self.model.eval()
            with torch.no_grad(), self.batches.paused():
                for members in sets:
                    with self.suppressor.suppress(members):
                        losses.append(scalar_loss(self.loss_fn(self.model, batch)))
        finally:
            for module, training in modes:
                module.training = training
        return torch.tensor(losses, dtype=torch.float64)

    def set_batches(self, batches: Iterable[Any], seen: int) -> None:
        self.batches.replace(batches, seen)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "importance_batches_seen": self.batches.seen}

    def check_state(self, state: Mapping[str, Any]) -> None:
        super().check_state(state)
        seen = state.get("importance_batches_seen", 0)
        if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
            raise ValueError(f"IST checkpoint entry 'importance_batches_seen' is {seen!r}; "
                             "expected an int >= 0")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.batches.fast_forward(int(state.get("importance_batches_seen", 0)))

    def remove(self) -> None:
        self.batches.remove()


@register_estimator
class PaperRound(SuppressionRound):
    """The paper's update: ``A_k = exp(-l_k) - mean_j exp(-l_j)``."""

    name = "paper"

    def update(self, scores: torch.Tensor, sets: list[list[int]],
               losses: torch.Tensor) -> torch.Tensor:
        return score_update(scores, sets, paper_advantages(losses), self.config.score_lr)


class _Normalized:
    """The standardized update shared by the normalized and first-order rounds."""

    config: ISTConfig
    scale: RunningScale

    def update(self, scores: torch.Tensor, sets: list[list[int]],
               losses: torch.Tensor) -> torch.Tensor:
        return normalized_score_update(
            scores, sets, losses, self.scale, self.config.score_lr,
            advantage_scale=self.config.advantage_scale, retention=self.config.score_retention)

    def _scale_state(self) -> dict[str, Any]:
        return {"scale": self.scale.state_dict()}


def _check_scale(state: Mapping[str, Any]) -> None:
    scale = state.get("scale")
    if scale is None:
        return
    ok = isinstance(scale, Mapping) and all(k in scale for k in ("decay", "value", "rounds"))
    if not ok:
        raise ValueError(f"IST checkpoint entry 'scale' is {scale!r}; expected a running "
                         "scale with 'decay', 'value' and 'rounds'")


@register_estimator
class NormalizedRound(_Normalized, SuppressionRound):
    """Suppressed losses, standardized advantages, retained scores."""

    name = "normalized"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.scale = RunningScale(decay=self.config.scale_decay)

    def state_dict(self) -> dict[str, Any]:
        return {**SuppressionRound.state_dict(self), **self._scale_state()}

    def check_state(self, state: Mapping[str, Any]) -> None:
        SuppressionRound.check_state(self, state)
        _check_scale(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        SuppressionRound.load_state_dict(self, state)
        if state.get("scale") is not None:
            self.scale.load_state_dict(state["scale"])


@register_estimator
class FirstOrderRound(_Normalized, ImportanceRound):
    """Predicted suppression deltas from the training backward; no extra forward."""

    name = "first-order"
    min_sets = 2  # one reached layer gives no comparison

    @classmethod
    def build(cls, context: RoundContext) -> ImportanceRound:
        return cls(context.config, context.num_suppressed, context.group, context.blocks,
                   context.suppressor.mode)

    def __init__(self, config: ISTConfig, num_suppressed: int, group: Any,
                 blocks: list[nn.Module], mode: str):
        super().__init__(config, num_suppressed, group)
        self.scale = RunningScale(decay=config.scale_decay)
        self.probe = FirstOrderProbe(blocks, mode)

    def measure(self, sampler: LayerSampler) -> tuple[list[list[int]], torch.Tensor]:
        sums, counts = self.probe.take()
        # Sum over the ranks first (every rank, always): the layers reached can differ
        # between ranks (LoRA on MoE experts), and the skip below must agree.
        n = counts.numel()
        totals = average_across_ranks(torch.cat([sums, counts.to(torch.float64)]), self.group)
        sums, counts = totals[:n], totals[n:]
        reached, deltas = predicted_suppression_deltas(sums, counts, self.config.suppression)
        return [[i] for i in reached], deltas

    def end_step(self) -> None:
        self.probe.end_step()

    def discard_step(self) -> None:
        self.probe.discard_step()

    def state_dict(self) -> dict[str, Any]:
        return {**ImportanceRound.state_dict(self), **self._scale_state(),
                "probe": self.probe.state_dict()}

    def check_state(self, state: Mapping[str, Any]) -> None:
        ImportanceRound.check_state(self, state)
        _check_scale(state)
        probe = state.get("probe")
        n = self.probe.num_layers
        if probe is not None and not (
                isinstance(probe, Mapping)
                and isinstance(probe.get("sums"), torch.Tensor) and probe["sums"].shape == (n,)
                and isinstance(probe.get("counts"), torch.Tensor)
                and probe["counts"].shape == (n,)):
            raise ValueError(f"IST checkpoint entry 'probe' is malformed; expected per-layer "
                             f"'sums' and 'counts' tensors of shape ({n},)")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ImportanceRound.load_state_dict(self, state)
        if state.get("scale") is not None:
            self.scale.load_state_dict(state["scale"])
        if state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])

    def remove(self) -> None:
        self.probe.remove()


def build_round(config: ISTConfig, runs_rounds: bool, *, num_suppressed: int, group: Any,
                model: nn.Module, blocks: list[nn.Module], batches: Iterable[Any] | None,
                loss_fn: LossFn | None, device: torch.device) -> ImportanceRound | None:
    """The round of ``config.estimator``, looked up in :mod:`ist_optim.registry`
    (``None`` when the sampling rule runs no rounds).

    Validates every adapter (the :class:`ist_optim.Suppressor`) before any hook is placed.
    """
    if not runs_rounds:
        return None
    suppressor = Suppressor(blocks, config.suppression, config.suppression_mode)
    return estimator(config.estimator).build(RoundContext(
        config, num_suppressed, group, model, blocks, suppressor, batches, loss_fn, device))
