"""Importance rounds: measure, average across ranks, update the scores.

Every ``update_interval`` steps :class:`ist_optim.ISTOptimizer` asks its round object to
:meth:`~ImportanceRound.run`; it never asks which class it has. An estimator is an
:class:`ImportanceRound` subclass registered by name
(:func:`ist_optim.registry.register_estimator`, see docs/extending.md) that writes three
members: its ``name``, :meth:`~ImportanceRound.measure` (candidate sets and one
measurement per set, from a read-only :class:`~ist_optim.sampling.sampler.SamplerView`)
and :meth:`~ImportanceRound.update` (the new scores); everything else is an optional hook
with a default. :class:`SuppressionRound` measures suppressed losses for the estimators
that need them. The built-in estimators, one module each with its math:

* :mod:`ist_optim.importance.paper` (:class:`~ist_optim.PaperRound`): the paper's
  response suppression, ``A_k = exp(-l_k) - mean``;
* :mod:`ist_optim.importance.normalized` (:class:`~ist_optim.NormalizedRound`): the same
  measurements, standardized advantages and retained scores;
* :mod:`ist_optim.importance.first_order` (:class:`~ist_optim.FirstOrderRound`): no
  forward; the per-layer ``<dL/dy, y>`` read from the training backward.

A round's collective (the ``all_reduce`` that averages measurements over the ranks) always
runs, on every rank, before any rank-local decision to skip the update, so ranks that see
different data (or reach different layers) never mismatch. Non-finite measurements skip
the update on every rank, with one warning per run.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ISTConfig
from ..distributed.ranks import average_across_ranks
from ..registry import estimator
from ..sampling.sampler import LayerSampler, SamplerView
from .batches import BatchSource, LossFn, default_loss_fn
from .suppression import Suppressor

__all__ = [
    "ImportanceRound",
    "RoundContext",
    "SuppressionRound",
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
    """Base of the estimators: the shared skip, update and checkpoint logic.

    An estimator sets :attr:`name` and implements :meth:`measure` and :meth:`update`;
    it is registered with :func:`ist_optim.registry.register_estimator`. The other
    members are optional hooks with defaults: :meth:`build` (from the
    :class:`RoundContext`), :attr:`min_sets`, :meth:`end_step` / :meth:`discard_step`
    (for estimators that read the training backward), :meth:`remove` (hooks it placed),
    and :meth:`state_dict` / :meth:`check_state` / :meth:`load_state_dict` (its own
    checkpoint state, beside the name and the skipped rounds the base saves).

    Example:
        >>> from ist_optim import ISTConfig
        >>> class Even(ImportanceRound):  # every layer a singleton set, "loss" its index
        ...     name = "doc-even"
        ...     def measure(self, sampler):
        ...         layers = list(range(sampler.num_layers))
        ...         return [[i] for i in layers], torch.tensor(layers, dtype=torch.float64)
        ...     def update(self, scores, sets, losses):
        ...         return scores + (losses - losses.mean())
        >>> sampler = LayerSampler.from_config(ISTConfig(active_layers=1), 3, seed=0)
        >>> Even(ISTConfig(), num_suppressed=1, group=None).run(sampler)
        >>> sampler.scores.tolist()
        [-1.0, 0.0, 1.0]
    """

    name: ClassVar[str] = ""
    min_sets = 1
    """Fewer candidate sets than this: no update (the scores keep their values)."""
    uses_batches: ClassVar[bool] = False
    """Whether the round measures batches (``importance_batches``, captured calls)."""

    @classmethod
    def build(cls, context: RoundContext) -> ImportanceRound:
        """The round of this estimator for one optimizer; by default
        ``cls(context.config, context.num_suppressed, context.group)`` (override it for a
        round that needs more of the context: the model, the blocks, the batches)."""
        return cls(context.config, context.num_suppressed, context.group)

    def __init__(self, config: ISTConfig, num_suppressed: int, group: Any):
        self.config = config
        self.num_suppressed = num_suppressed
        self.group = group
        self.skipped_rounds = 0
        self._warned_nonfinite = False
        self.last: dict[str, Any] | None = None

    def measure(self, sampler: SamplerView) -> tuple[list[list[int]], torch.Tensor]:
        """Candidate sets and one measurement ("loss") per set, already averaged across
        the ranks (:func:`ist_optim.distributed.ranks.average_across_ranks`, called on
        every rank, always). ``sampler`` reads the scores and step count and draws
        candidate sets with the run's private generator."""
        raise NotImplementedError(f"estimator {self.name!r} does not define measure()")

    def update(self, scores: torch.Tensor, sets: list[list[int]],
               losses: torch.Tensor) -> torch.Tensor:
        """The new scores (shape ``(L,)``) from the current ones and :meth:`measure`'s
        sets and finite measurements."""
        raise NotImplementedError(f"estimator {self.name!r} does not define update()")

    def run(self, sampler: LayerSampler) -> None:
        """Measure and update ``sampler``'s scores (or skip the update, on every rank)."""
        sets, losses = self.measure(sampler.view())
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
        """The estimator's name and the skipped rounds; an estimator with state of its own
        adds it (``{**super().state_dict(), ...}``)."""
        return {"estimator": self.name, "skipped_rounds": self.skipped_rounds}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Validate a :meth:`state_dict`, changing nothing (extend it with ``super()``).

        Raises:
            ValueError: for another estimator's checkpoint, naming both, or a malformed
                entry.
        """
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
        """Load a :meth:`state_dict` after :meth:`check_state` (extend it with ``super()``)."""
        self.check_state(state)
        self.skipped_rounds = int(state.get("skipped_rounds", 0))

    def remove(self) -> None:
        """Remove any hook this round placed on the model."""

    def end_step(self) -> None:
        """Called once per optimizer step, after the training backward (probes that read
        the backward close the step's measurement here)."""

    def discard_step(self) -> None:
        """Forget what the current step's backward measured (the step is skipped)."""

    def move_to(self, device: torch.device) -> None:
        """Run on the model where it is now (it moved before the first step); rounds that
        measure nothing of their own ignore it."""

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
    """Measures the loss of one batch with each candidate set's responses damped: the
    base of the estimators that suppress (they write only :meth:`update`).

    Each round draws ``num_candidates`` sets of ``num_suppressed`` layers with weights
    ``sigmoid(s)`` and runs one no-grad forward per set on the next batch of its
    :class:`~ist_optim.importance.batches.BatchSource` (the ``importance_batches``, or
    the latest training call).
    """

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

    def move_to(self, device: torch.device) -> None:
        self.device = device

    def measure(self, sampler: SamplerView) -> tuple[list[list[int]], torch.Tensor]:
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
