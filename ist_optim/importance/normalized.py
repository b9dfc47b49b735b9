"""The ``"normalized"`` estimator: suppressed losses, standardized advantages, retained scores.

The same K suppressed losses as ``"paper"``, standardized so that a round's step means the
same at any loss level, and scores that forget old rounds so they stay bounded. With
``mean`` the mean of the round's losses and ``sigma_t`` their (population) standard
deviation::

    m_t = sigma_1                                  (first round)
    m_t = beta * m_{t-1} + (1 - beta) * sigma_t    (later rounds, beta = 0.9)
    c_t = max(sigma_t, m_t)                        (the scale)
    z_k = (mean - l_k) / c_t                       (0 when c_t = 0)
    A_k = tau * z_k                                (tau = 0.1)
    s  <- rho * s                                  (rho = 0.9), then the score update
                                                   (:func:`ist_optim.score_update`)

A set whose suppression hurts least gets a positive advantage, so its layers' scores
rise and they are trained less. ``c_t >= sigma_t`` gives ``sum_k z_k^2 <= K``, so
one round moves a score by at most ``eta * tau * K / 4`` (0.75 at the defaults)
whatever the loss level (``eta * tau * sqrt(K - 1) / 4`` for singleton sets), and the
retention ``rho`` bounds every score by that step over ``1 - rho``; in practice
scores settle within about +-2 (a sampling max/min ratio of a few units) and reflect
the last ``1 / (1 - rho) = 10`` rounds. ``tau`` makes the paper's ``eta = 10`` move a
score by about 0.25 per round and unit of standardized advantage. The running mean
``m_t`` (saved in checkpoints) makes a round whose losses differ less than usual move
scores less: a quiet round is weak evidence. The ``"first-order"`` estimator
(:mod:`ist_optim.importance.first_order`) feeds its predicted losses to the same update.

Example:
    >>> scale = RunningScale()
    >>> normalized_advantages(torch.tensor([3.0, 3.5, 4.0]), scale)
    tensor([ 0.1225,  0.0000, -0.1225], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ISTConfig
from ..registry import register_estimator
from .rounds import SuppressionRound
from .scores import score_update

__all__ = [
    "ADVANTAGE_SCALE",
    "SCORE_RETENTION",
    "NormalizedRound",
    "NormalizedUpdate",
    "RunningScale",
    "check_scale_state",
    "normalized_advantages",
    "normalized_score_update",
]

ADVANTAGE_SCALE: float = ISTConfig.advantage_scale
"""``tau``: standardized advantages are scaled so that eta = 10 moves a score by about
``eta * tau / 4 = 0.25`` per unit of standardized advantage and round."""
SCORE_RETENTION: float = ISTConfig.score_retention
"""``rho``: scores keep this fraction of their value at each normalized round."""


@dataclass
class RunningScale:
    """Running scale ``m_t`` of the per-round loss spread (see the module docstring).

    Attributes:
        decay: ``beta``, the weight of the past in the running mean.
        value: ``m_t``; meaningless while ``rounds == 0``.
        rounds: rounds seen.

    Example:
        >>> scale = RunningScale(decay=0.5)
        >>> scale.update(2.0), scale.update(1.0), scale.update(4.0)
        (2.0, 1.5, 4.0)
    """

    decay: float = ISTConfig.scale_decay
    value: float = 0.0
    rounds: int = 0

    def update(self, round_std: float) -> float:
        """Fold in this round's spread ``sigma_t``; return the scale ``max(sigma_t, m_t)``."""
        if not math.isfinite(round_std) or round_std < 0:
            raise ValueError(f"round spread must be finite and >= 0, got {round_std}")
        if self.rounds == 0:
            self.value = round_std
        else:
            self.value = self.decay * self.value + (1.0 - self.decay) * round_std
        self.rounds += 1
        return max(round_std, self.value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "value": self.value, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.value = float(state["value"])
        self.rounds = int(state["rounds"])


def normalized_advantages(
    losses: torch.Tensor, scale: RunningScale, advantage_scale: float = ADVANTAGE_SCALE
) -> torch.Tensor:
    """``A_k = tau * (mean - l_k) / max(sigma_t, m_t)``; updates ``scale`` in place.

    Args:
        losses: the round's K losses (suppressed losses, or predicted loss changes).
        scale: the running scale, updated with this round's standard deviation.
        advantage_scale: ``tau``.

    Returns:
        float64 advantages, summing to zero, with ``sum A_k^2 <= K tau^2``.
    """
    losses64 = losses.detach().to(torch.float64).flatten()
    if losses64.numel() == 0:
        raise ValueError("normalized_advantages needs at least one loss")
    if not torch.isfinite(losses64).all():
        raise ValueError(f"losses must be finite, got {losses64.tolist()}")
    centered = losses64.mean() - losses64
    spread = float(centered.pow(2).mean().sqrt())
    if spread <= 16 * torch.finfo(torch.float64).eps * float(losses64.abs().max()):
        spread, centered = 0.0, torch.zeros_like(centered)  # equal up to rounding
    c = scale.update(spread)
    if c == 0.0:
        return torch.zeros_like(losses64)
    return advantage_scale * centered / c


def normalized_score_update(
    scores: torch.Tensor,
    candidate_sets: Sequence[Sequence[int]],
    losses: torch.Tensor,
    scale: RunningScale,
    step_size: float,
    *,
    advantage_scale: float = ADVANTAGE_SCALE,
    retention: float = SCORE_RETENTION,
) -> torch.Tensor:
    """One round of the ``"normalized"`` / ``"first-order"`` estimators.

    ``s <- score_update(rho * s, sets, A, eta)`` with ``A`` from
    :func:`normalized_advantages`, ``tau = advantage_scale`` and ``rho = retention``.

    Example:
        >>> s = torch.zeros(4, dtype=torch.float64)
        >>> normalized_score_update(s, [[0, 1], [2, 3]], torch.tensor([1.0, 2.0]),
        ...                         RunningScale(), 10.0).tolist()
        [0.25, 0.25, -0.25, -0.25]
    """
    advantages = normalized_advantages(losses, scale, advantage_scale)
    return score_update(retention * scores, candidate_sets, advantages, step_size)


class NormalizedUpdate:
    """The standardized update shared by the normalized and first-order rounds (a mixin:
    the round holds ``config`` and a :class:`RunningScale` as ``scale``)."""

    config: ISTConfig
    scale: RunningScale

    def update(self, scores: torch.Tensor, sets: list[list[int]],
               losses: torch.Tensor) -> torch.Tensor:
        return normalized_score_update(
            scores, sets, losses, self.scale, self.config.score_lr,
            advantage_scale=self.config.advantage_scale, retention=self.config.score_retention)

    def scale_state(self) -> dict[str, Any]:
        """The running scale's entry of the round's checkpoint state."""
        return {"scale": self.scale.state_dict()}


def check_scale_state(state: Mapping[str, Any]) -> None:
    """Validate the ``"scale"`` entry of a round's checkpoint state (absent: fine).

    Raises:
        ValueError: for a scale without ``decay``, ``value`` and ``rounds``.
    """
    scale = state.get("scale")
    if scale is None:
        return
    ok = isinstance(scale, Mapping) and all(k in scale for k in ("decay", "value", "rounds"))
    if not ok:
        raise ValueError(f"IST checkpoint entry 'scale' is {scale!r}; expected a running "
                         "scale with 'decay', 'value' and 'rounds'")


@register_estimator
class NormalizedRound(NormalizedUpdate, SuppressionRound):
    """Suppressed losses, standardized advantages, retained scores."""

    name = "normalized"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.scale = RunningScale(decay=self.config.scale_decay)

    def state_dict(self) -> dict[str, Any]:
        return {**SuppressionRound.state_dict(self), **self.scale_state()}

    def check_state(self, state: Mapping[str, Any]) -> None:
        SuppressionRound.check_state(self, state)
        check_scale_state(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        SuppressionRound.load_state_dict(self, state)
        if state.get("scale") is not None:
            self.scale.load_state_dict(state["scale"])
