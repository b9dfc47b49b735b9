"""Stochastic layer sampling: pure functions of weights and a private generator.

Every function here takes an explicit ``torch.Generator`` and never touches the global
RNGs, so a run is reproducible from its seed and a checkpoint of the generator state.
"""

from __future__ import annotations

import math

import torch

__all__ = ["resolve_count", "sample_layers", "sample_candidate_sets", "sampling_weights"]


def resolve_count(value: int | float, num_layers: int, name: str) -> int:
    """Turn an int count or a float fraction of ``num_layers`` into a layer count.

    A fraction ``f`` gives ``max(1, int(f * num_layers))``, the paper's rounding
    (``int(0.25 * 32) == 8``) with at least one layer.

    Raises:
        TypeError: for a bool or a non-number.
        ValueError: for an int outside ``[1, num_layers]`` or a float outside ``(0, 1]``.

    Example:
        >>> resolve_count(0.25, 32, "active_layers"), resolve_count(3, 32, "active_layers")
        (8, 3)
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be an int count or a float fraction, got {value!r}")
    if isinstance(value, int):
        if not 1 <= value <= num_layers:
            raise ValueError(
                f"{name}={value} is outside [1, {num_layers}] for a model with {num_layers} "
                f"layers; pass a count in that range or a fraction in (0, 1]"
            )
        return value
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(
            f"{name}={value} is not a fraction in (0, 1]; pass e.g. 0.25, or an int count"
        )
    return max(1, int(value * num_layers))


def sampling_weights(scores: torch.Tensor, sign: float) -> torch.Tensor:
    """``sigmoid(sign * scores)`` in float64, clamped away from zero so every layer stays drawable.

    IST trains layers with weights ``sigmoid(-s)`` (``sign=-1``) and suppresses candidate
    sets with weights ``sigmoid(s)`` (``sign=+1``).
    """
    weights = torch.sigmoid(sign * scores.detach().to(torch.float64))
    return weights.clamp_min(torch.finfo(torch.float64).tiny)


def sample_layers(weights: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """Draw ``k`` distinct layer indices without replacement, proportionally to ``weights``.

    Draws are sequential weighted draws without replacement (torch.multinomial).

    Returns:
        The drawn indices, sorted ascending.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> picked = sample_layers(torch.ones(8), 3, g)
        >>> len(picked), len(set(picked)), all(0 <= i < 8 for i in picked)
        (3, 3, True)
    """
    if weights.dim() != 1:
        raise ValueError(f"weights must be 1-D, got shape {tuple(weights.shape)}")
    if not 1 <= k <= weights.numel():
        raise ValueError(f"cannot draw k={k} distinct layers out of {weights.numel()}")
    if k == weights.numel():
        return list(range(k))
    drawn = torch.multinomial(weights.detach().cpu().double(), k, replacement=False,
                              generator=generator)
    return sorted(int(i) for i in drawn)


def sample_candidate_sets(
    weights: torch.Tensor,
    set_size: int,
    num_sets: int,
    generator: torch.Generator,
    max_tries: int = 100,
) -> list[list[int]]:
    """Draw ``num_sets`` distinct sets of ``set_size`` layers each (the paper's candidates).

    A set equal to an earlier one is re-drawn, as in the official code; when there are
    fewer distinct sets than ``num_sets`` (or ``max_tries`` re-draws do not find a new
    one), the sets found so far are returned.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sets = sample_candidate_sets(torch.ones(6), 3, 3, g)
        >>> len(sets), len({tuple(s) for s in sets})
        (3, 3)
    """
    if num_sets < 1:
        raise ValueError(f"num_sets must be >= 1, got {num_sets}")
    distinct = math.comb(weights.numel(), set_size)
    sets: list[list[int]] = []
    tries = 0
    while len(sets) < min(num_sets, distinct) and tries < num_sets + max_tries:
        tries += 1
        candidate = sample_layers(weights, set_size, generator)
        if candidate not in sets:
            sets.append(candidate)
    return sets
