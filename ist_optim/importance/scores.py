"""Importance scores: the pure score update of the IST paper, shared by every estimator.

Scores ``s`` start at zero. A round measures K candidate sets ``S_k`` of layers, turns the
measurements into advantages ``A_k`` (the estimator's math: :mod:`.paper`,
:mod:`.normalized`, :mod:`.first_order`), and updates, with ``p = sigmoid(s)`` taken
before the update::

    s_i <- s_i + eta * sum_k A_k * 1[i in S_k] * p_i * (1 - p_i)

A high score means "suppressing this layer hurts little", i.e. low importance, so the
public importance is ``-s``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["membership_matrix", "score_update"]


def membership_matrix(candidate_sets: Sequence[Sequence[int]], num_layers: int) -> torch.Tensor:
    """``M[k, i] = 1`` when layer ``i`` is in candidate set ``k`` (float64, shape K x L)."""
    membership = torch.zeros(len(candidate_sets), num_layers, dtype=torch.float64)
    for k, members in enumerate(candidate_sets):
        membership[k, list(members)] = 1.0
    return membership


def score_update(
    scores: torch.Tensor,
    candidate_sets: Sequence[Sequence[int]],
    advantages: torch.Tensor,
    step_size: float,
) -> torch.Tensor:
    """Return the scores after one round: ``s + eta * (A @ M) * p * (1 - p)``.

    Args:
        scores: current scores, shape ``(L,)``.
        candidate_sets: the K suppressed sets, lists of layer indices.
        advantages: one advantage per set, shape ``(K,)``.
        step_size: ``eta``.

    Example:
        >>> s = torch.zeros(4, dtype=torch.float64)
        >>> score_update(s, [[0, 1], [2, 3]], torch.tensor([0.5, -0.5]), 10.0).tolist()
        [1.25, 1.25, -1.25, -1.25]
    """
    scores64 = scores.to(torch.float64)
    p = torch.sigmoid(scores64)
    membership = membership_matrix(candidate_sets, scores.numel())
    delta = step_size * (advantages.to(torch.float64) @ membership) * p * (1.0 - p)
    return (scores64 + delta).to(scores.dtype)
