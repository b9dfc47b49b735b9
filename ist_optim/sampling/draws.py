"""Stochastic layer sampling: pure functions of weights and a private generator.

Every function here takes an explicit ``torch.Generator`` and never touches the global
RNGs, so a run is reproducible from its seed and a checkpoint of the generator state.
"""

from __future__ import annotations

import math

import torch

from ..config import check_count

__all__ = [
    "depth_window",
    "distribution_spread",
    "resolve_count",
    "sample_candidate_sets",
    "sample_depth_aware",
    "sample_layers",
    "sampling_weights",
]


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
    check_count(name, value, num_layers)
    if isinstance(value, int):
        return value
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
    _check_weights(weights, k)
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


def _check_weights(weights: torch.Tensor, k: int) -> None:
    if weights.dim() != 1:
        raise ValueError(f"weights must be 1-D, got shape {tuple(weights.shape)}")
    if not 1 <= k <= weights.numel():
        raise ValueError(f"cannot draw k={k} distinct layers out of {weights.numel()}")


def depth_window(anchor: int, offset: int, num_layers: int, k: int, window: int) -> range:
    """The contiguous layer window of the depth-aware sampler (deterministic part).

    The window of width ``window`` starts at ``anchor - window + 1 + offset`` (so it holds
    ``anchor`` for every ``offset`` in ``[0, window)``) and is cut to ``[0, num_layers)``;
    a cut window with fewer than ``k`` layers is widened inward to ``k`` layers.

    Example:
        >>> depth_window(5, 2, 8, 2, 4), depth_window(0, 0, 8, 2, 4), depth_window(7, 3, 8, 3, 4)
        (range(4, 8), range(0, 2), range(5, 8))
    """
    if not 0 <= anchor < num_layers or not 0 <= offset < window:
        raise ValueError(f"anchor={anchor} / offset={offset} out of range")
    if not 1 <= k <= window <= num_layers:
        raise ValueError(f"need 1 <= k={k} <= window={window} <= num_layers={num_layers}")
    low = anchor - window + 1 + offset
    start, stop = max(0, low), min(num_layers, low + window)
    if stop - start < k:
        if start == 0:
            stop = k
        else:
            start = num_layers - k
    return range(start, stop)


def sample_depth_aware(
    weights: torch.Tensor, k: int, generator: torch.Generator, window: int | None = None
) -> list[int]:
    """Draw ``k`` distinct layers clustered in depth, keeping importance weighting.

    Backward cost is set by the lowest trained layer. Random draws of ``k`` layers out of
    ``L`` put the lowest one near the bottom (its expectation is about ``(L-k)/(k+1)``
    for equal weights). This sampler keeps the draws close together:

    1. an *anchor* layer ``a`` is drawn proportionally to ``weights``;
    2. an offset ``o`` uniform in ``[0, window)`` places a window of ``window``
       consecutive layers holding ``a`` (:func:`depth_window`; cut at the model's ends and
       widened inward to ``k`` layers when cut too short);
    3. the other ``k - 1`` layers are drawn inside the window, without replacement,
       proportionally to ``weights``.

    Every layer is reachable (as anchor, with probability ``w_i / sum(w)``), importance
    still decides both the anchor and the companions, and the lowest trained layer sits
    near ``a - window / 2`` instead of near the bottom. Cut windows at the ends are
    smaller, which raises the chance of their members and keeps the per-layer training
    frequency near uniform for equal weights (docs/importance.md has the figures).

    Args:
        weights: non-negative per-layer weights (the importance weights ``sigmoid(-s)``).
        k: layers to draw.
        generator: the private generator.
        window: window width, in ``[k, L]``; default ``min(2 k, L)``. ``window = L``
            draws like :func:`sample_layers` except for the anchor step.

    Returns:
        The drawn indices, sorted ascending.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> picked = sample_depth_aware(torch.ones(12), 3, g)
        >>> len(set(picked)), max(picked) - min(picked) < 6
        (3, True)
    """
    _check_weights(weights, k)
    num_layers = weights.numel()
    window = min(2 * k, num_layers) if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not k <= window <= num_layers:
        raise ValueError(
            f"Invalid window: {window!r}; expected an int in [k={k}, num_layers={num_layers}]"
        )
    w64 = weights.detach().cpu().double()
    anchor = int(torch.multinomial(w64, 1, generator=generator))
    offset = int(torch.randint(window, (1,), generator=generator))
    span = [i for i in depth_window(anchor, offset, num_layers, k, window) if i != anchor]
    if k == 1:
        return [anchor]
    if k - 1 == len(span):
        return sorted([anchor, *span])
    picked = torch.multinomial(w64[span], k - 1, replacement=False, generator=generator)
    return sorted([anchor, *(span[int(i)] for i in picked)])


def distribution_spread(probabilities: torch.Tensor) -> dict[str, float]:
    """How far a sampling distribution is from uniform.

    Returns:
        ``max_min_ratio``: largest over smallest probability (1.0 = uniform);
        ``kl_from_uniform``: ``KL(p || uniform) = sum p_i log(L p_i)`` in nats (0 = uniform,
        at most ``log L``); ``entropy_ratio``: entropy over ``log L`` (1.0 = uniform).

    Example:
        >>> distribution_spread(torch.tensor([0.25, 0.25, 0.25, 0.25]))["max_min_ratio"]
        1.0
        >>> round(distribution_spread(torch.tensor([0.5, 0.25, 0.25]))["max_min_ratio"], 3)
        2.0
    """
    if probabilities.dim() != 1 or probabilities.numel() == 0:
        raise ValueError(f"probabilities must be a non-empty 1-D tensor, got "
                         f"{tuple(probabilities.shape)}")
    p = probabilities.detach().cpu().double()
    if (p < 0).any() or not torch.isfinite(p).all():
        raise ValueError(f"probabilities must be finite and non-negative, got {p.tolist()}")
    p = p / p.sum()
    n = p.numel()
    positive = p[p > 0]
    kl = float((positive * torch.log(positive * n)).sum())
    entropy_ratio = 1.0 if n == 1 else float(-(positive * positive.log()).sum() / math.log(n))
    smallest = float(p.min())
    ratio = math.inf if smallest == 0.0 else float(p.max()) / smallest
    return {"max_min_ratio": ratio, "kl_from_uniform": max(kl, 0.0),
            "entropy_ratio": entropy_ratio}
