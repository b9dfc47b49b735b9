"""Read-only views of an :class:`ist_optim.ISTOptimizer`'s parts, for logs, callbacks and
tests: the layers, the sampler's state, the rounds' outcome and the state policy.

:class:`ISTViews` only reads the parts the optimizer composes (``layer_groups``,
``sampler``, ``rounds``, ``activator``, ``config``); it changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ISTConfig
from .core.activator import LayerActivator
from .core.groups import LayerGroups
from .importance.rounds import ImportanceRound
from .memory.budget import MemoryBudget
from .memory.residency import StatePolicy
from .sampling.sampler import LayerSampler

__all__ = ["ISTViews"]


class ISTViews:
    """The read-only properties of :class:`ist_optim.ISTOptimizer`."""

    config: ISTConfig
    layer_groups: LayerGroups
    sampler: LayerSampler
    rounds: ImportanceRound | None
    activator: LayerActivator
    #: The ranks that agree on the IST state; ``None`` when not distributed.
    process_group: Any

    @property
    def num_layers(self) -> int:
        """Number of layers (blocks holding at least one trainable parameter)."""
        return self.layer_groups.num_layers

    @property
    def layer_names(self) -> list[str]:
        """Module name of each layer, e.g. ``base_model.model.model.layers.3``."""
        return list(self.layer_groups.names)

    @property
    def groups(self) -> LayerGroups:
        """Alias of :attr:`layer_groups` (the per-layer parameters, not ``param_groups``)."""
        return self.layer_groups

    @property
    def num_active(self) -> int:
        """The configured ``active_layers`` as a count, ``N_u`` (what the schedule falls back
        to); the coming step may train another number: :attr:`num_trained`."""
        return self.sampler.num_active

    @property
    def num_trained(self) -> int:
        """Layers the coming step trains, ``len(active_layers)``: :attr:`num_active`
        outside ``dense_steps``/``ramp_steps``/``active_schedule``, else the schedule's
        count (all of them in a dense step)."""
        return len(self.activator.active)

    @property
    def active_layers(self) -> list[int]:
        """Sorted indices of the layers that train in the coming step."""
        return self.activator.active

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken so far."""
        return self.sampler.num_steps

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (``skip_nonfinite=True``)."""
        return self.sampler.skipped_steps

    @property
    def seed(self) -> int:
        """The seed of the private generator (agreed across ranks)."""
        return self.sampler.seed

    @property
    def update_interval(self) -> int:
        """Steps between importance rounds."""
        return self.config.update_interval

    @property
    def runs_importance_rounds(self) -> bool:
        """Whether the sampling rule runs importance rounds."""
        return self.rounds is not None

    @property
    def importance(self) -> torch.Tensor:
        """Per-layer importance, higher = more important (the negated IST score)."""
        return (-self.sampler.scores).to(torch.float32)

    @property
    def scores(self) -> torch.Tensor:
        """The raw IST scores ``s`` (higher = suppressing the layer hurts less)."""
        return self.sampler.scores.clone()

    @property
    def sampling_probabilities(self) -> torch.Tensor:
        """Per-draw probability of each layer: the sampling weights, normalised to sum 1."""
        return self.sampler.probabilities()

    def sampling_spread(self) -> dict[str, float]:
        """Max/min ratio and KL from uniform of :attr:`sampling_probabilities` (for logs)."""
        return self.sampler.spread()

    @property
    def budget_policy(self) -> MemoryBudget | None:
        """The object that runs ``memory_budget``: it picks and switches the blocks each
        step checkpoints (``None`` without a budget). The budget's size is
        ``config.memory_budget_bytes``."""
        return self.activator.budget

    @property
    def memory_budget(self) -> MemoryBudget | None:
        """Alias of :attr:`budget_policy`, kept for code written before it (the option's
        value is ``config.memory_budget``)."""
        return self.activator.budget

    @property
    def state_policy(self) -> StatePolicy:
        """The state policy in use (the device default resolved)."""
        return self.activator.residency.policy

    @property
    def last_round(self) -> dict[str, Any] | None:
        """Step, candidate sets and measurements of the latest round that updated scores."""
        return self.rounds.last if self.rounds is not None else None

    @property
    def skipped_rounds(self) -> int:
        """Rounds skipped because a measurement was not finite."""
        return self.rounds.skipped_rounds if self.rounds is not None else 0

    def fingerprint(self) -> dict[str, Any]:
        """The sampler's step, scores, seed and generator hash, and the active set (rank
        checks)."""
        return {**self.sampler.fingerprint(), "active_layers": self.active_layers}
