"""The ``"paper"`` estimator (the default): the IST paper's response suppression.

A round draws K candidate sets ``S_k`` with weights ``sigmoid(s)``, measures the loss
``l_k`` of one batch with the responses of ``S_k`` damped (:class:`ist_optim.Suppressor`),
and updates the scores with :func:`ist_optim.importance.scores.score_update` and the
paper's advantage::

    R_k = exp(-l_k)          A_k = R_k - mean_j R_j

Its size depends on the loss level: at a loss near 3.4, rewards differ by about ``1e-3``
between candidate sets, so ``eta = 10`` moves scores by about ``1e-4`` a round and sampling
stays practically uniform (the ``"normalized"`` estimator standardizes it).

Example:
    >>> paper_advantages(torch.tensor([0.0, 0.0])).tolist()
    [0.0, 0.0]
"""

from __future__ import annotations

import torch

from ..registry import register_estimator
from .rounds import SuppressionRound
from .scores import score_update

__all__ = ["PaperRound", "paper_advantages"]


def paper_advantages(losses: torch.Tensor) -> torch.Tensor:
    """The paper's advantage: ``exp(-l_k) - mean_j exp(-l_j)`` (float64).

    Example:
        >>> a = paper_advantages(torch.tensor([1.0, 2.0]))
        >>> bool(a[0] > 0 > a[1]), round(float(a.sum()), 12)
        (True, 0.0)
    """
    rewards = torch.exp(-losses.to(torch.float64))
    return rewards - rewards.mean()


@register_estimator
class PaperRound(SuppressionRound):
    """The paper's update: ``A_k = exp(-l_k) - mean_j exp(-l_j)``."""

    name = "paper"

    def update(self, scores: torch.Tensor, sets: list[list[int]],
               losses: torch.Tensor) -> torch.Tensor:
        return score_update(scores, sets, paper_advantages(losses), self.config.score_lr)
