"""Sampling rules: how the layers of a training step are drawn, one class per rule.

A rule turns the per-layer scores into draw weights and draws ``count`` distinct layers
with the sampler's private generator. The built-in rules, registered by name (see
:mod:`ist_optim.registry` and docs/extending.md for adding one):

* ``"importance"`` (the paper): weights ``sigmoid(-s)``, drawn without replacement;
* ``"uniform"`` (LISA-style): equal weights; runs no importance rounds;
* ``"depth-aware"``: importance weights, the layers drawn clustered in depth
  (:func:`ist_optim.sampling.draws.sample_depth_aware`), so the backward stops higher.

Example:
    >>> import torch
    >>> from ist_optim import ISTConfig
    >>> rule = UniformRule(num_layers=8, num_active=2, config=ISTConfig())
    >>> rule.draw(rule.weights(torch.zeros(8)), 2, torch.Generator().manual_seed(0))
    [6, 7]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..registry import register_sampling_rule
from .draws import sample_depth_aware, sample_layers, sampling_weights

if TYPE_CHECKING:
    from ..config import ISTConfig

__all__ = ["DepthAwareRule", "ImportanceRule", "SamplingRule", "UniformRule"]


class SamplingRule:
    """Base of the sampling rules: importance weights, draws without replacement.

    Subclasses set :attr:`name` and override :meth:`weights` and/or :meth:`draw`;
    decorate them with :func:`ist_optim.registry.register_sampling_rule`.

    Args:
        num_layers: number of layers ``L``.
        num_active: the configured layers per step ``N_u`` (a schedule may ask a draw for
            another count, see :class:`ist_optim.ActiveSchedule`).
        config: the optimizer's options, for rule-specific settings; validate them here
            (the constructor runs when the optimizer is built).
    """

    name: ClassVar[str] = ""
    runs_rounds: ClassVar[bool] = True
    """Whether importance rounds update the scores this rule reads."""
    observes_gradients: ClassVar[bool] = False
    """Whether :meth:`observe` is called after each step with the trained layers' gradient
    norms (one device sync per step; off for the built-in rules)."""

    def __init__(self, num_layers: int, num_active: int, config: ISTConfig):
        self.num_layers = num_layers
        self.num_active = num_active

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """Per-layer draw weights (float64, positive) from the scores ``s``."""
        return sampling_weights(scores, -1.0)

    def draw(self, weights: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
        """``count`` distinct layers (sorted), drawn with ``generator`` only."""
        return sample_layers(weights, count, generator)

    def observe(self, grad_norms: Mapping[int, float]) -> None:
        """After a step (rules with :attr:`observes_gradients`): the L2 norm of the
        gradient of each layer that trained, by layer index."""

    # checkpoint: a rule with state of its own saves it in the sampler's entry -----------
    def state_dict(self) -> dict[str, Any]:
        """The rule's own state (plain types and tensors); empty for stateless rules."""
        return {}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Validate a :meth:`state_dict`, changing nothing.

        Raises:
            ValueError: naming what is missing or malformed.
        """

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` that :meth:`check_state` accepted."""


@register_sampling_rule
class ImportanceRule(SamplingRule):
    """The paper's draw: weights ``sigmoid(-s)``, without replacement."""

    name = "importance"


@register_sampling_rule
class UniformRule(SamplingRule):
    """LISA-style: every layer equally likely; no importance rounds."""

    name = "uniform"
    runs_rounds = False

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.ones(self.num_layers, dtype=torch.float64)


@register_sampling_rule
class DepthAwareRule(SamplingRule):
    """Importance weights, layers drawn clustered in a window of ``depth_window`` layers
    (default ``min(2 N_u, L)``); a draw of more layers than the window widens it."""

    name = "depth-aware"

    def __init__(self, num_layers: int, num_active: int, config: ISTConfig):
        super().__init__(num_layers, num_active, config)
        window = config.depth_window
        if window is not None and not num_active <= window <= num_layers:
            raise ValueError(
                f"Invalid depth_window: {window}; expected an int in "
                f"[active layers={num_active}, layers={num_layers}]"
            )
        self.window = min(2 * num_active, num_layers) if window is None else window

    def draw(self, weights: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
        return sample_depth_aware(weights, count, generator, max(self.window, count))
