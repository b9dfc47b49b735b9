"""Depth-aware sampling: property tests of the pure sampler and its optimizer wiring."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from conftest import lm_batch, lora_model
from hypothesis import given, settings
from hypothesis import strategies as st

from ist_optim import ISTOptimizer
from ist_optim.sampling.draws import (
    depth_window,
    distribution_spread,
    sample_depth_aware,
    sample_layers,
)


@st.composite
def problems(draw, max_layers: int = 12):
    num_layers = draw(st.integers(1, max_layers))
    k = draw(st.integers(1, num_layers))
    window = draw(st.integers(k, num_layers))
    weights = draw(st.lists(st.floats(1e-3, 1e3), min_size=num_layers, max_size=num_layers))
    return torch.tensor(weights, dtype=torch.float64), k, window


def _ordered_draws(weights: list[float], pool: list[int], count: int):
    """Exact distribution of sequential weighted draws without replacement: (set, prob)."""
    for order in itertools.permutations(pool, count):
        prob, left = 1.0, sum(weights[i] for i in pool)
        for i in order:
            prob *= weights[i] / left
            left -= weights[i]
        yield frozenset(order), prob


def exact_depth_aware(weights: list[float], k: int, window: int) -> dict[frozenset, float]:
    """The sampler's exact output distribution, by enumeration (small L only)."""
    n, total = len(weights), sum(weights)
    dist: dict[frozenset, float] = {}
    for anchor in range(n):
        for offset in range(window):
            span = [i for i in depth_window(anchor, offset, n, k, window) if i != anchor]
            base = weights[anchor] / total / window
            for rest, prob in _ordered_draws(weights, span, k - 1):
                key = rest | {anchor}
                dist[key] = dist.get(key, 0.0) + base * prob
    return dist


def exact_random(weights: list[float], k: int) -> dict[frozenset, float]:
    dist: dict[frozenset, float] = {}
    for chosen, prob in _ordered_draws(weights, list(range(len(weights))), k):
        dist[chosen] = dist.get(chosen, 0.0) + prob
    return dist


def expected_lowest(dist: dict[frozenset, float]) -> float:
    return sum(prob * min(chosen) for chosen, prob in dist.items())


# ---------------------------------------------------------------- pure sampler
@given(problems(), st.integers(0, 2**31 - 1))
def test_draws_k_distinct_valid_sorted_layers(problem, seed):
    weights, k, window = problem
    picked = sample_depth_aware(weights, k, torch.Generator().manual_seed(seed), window)
    assert len(picked) == k == len(set(picked))
    assert picked == sorted(picked)
    assert all(0 <= i < weights.numel() for i in picked)
    assert max(picked) - min(picked) < max(window, k)


@given(problems(), st.integers(0, 2**31 - 1))
def test_same_seed_same_draws(problem, seed):
    weights, k, window = problem
    first = [sample_depth_aware(weights, k, g, window)
             for g in [torch.Generator().manual_seed(seed)] for _ in range(5)]
    second = [sample_depth_aware(weights, k, g, window)
              for g in [torch.Generator().manual_seed(seed)] for _ in range(5)]
    assert first == second


@given(problems(max_layers=7))
@settings(max_examples=60, deadline=None)
def test_exact_distribution_reaches_every_layer_and_sums_to_one(problem):
    weights, k, window = problem
    dist = exact_depth_aware(weights.tolist(), k, window)
    assert math.isclose(sum(dist.values()), 1.0, rel_tol=1e-9)
    assert all(len(chosen) == k for chosen in dist)
    for layer in range(weights.numel()):
        assert sum(p for chosen, p in dist.items() if layer in chosen) > 0


@given(st.integers(2, 7), st.data())
@settings(max_examples=40, deadline=None)
def test_expected_lowest_layer_is_higher_than_random(num_layers, data):
    """Exact expectations, equal weights: strictly higher whenever the window is narrower."""
    k = data.draw(st.integers(1, num_layers))
    window = data.draw(st.integers(k, num_layers))
    weights = [1.0] * num_layers
    depth = expected_lowest(exact_depth_aware(weights, k, window))
    rand = expected_lowest(exact_random(weights, k))
    assert depth >= rand - 1e-12
    if k >= 2 and window < num_layers:
        assert depth > rand + 1e-9


def test_unequal_weights_can_lower_the_expectation_slightly():
    """The documented corner case: window = k forces a low-weight bottom partner."""
    weights = [0.25, 1.0, 1.0]
    depth = expected_lowest(exact_depth_aware(weights, 2, 2))
    rand = expected_lowest(exact_random(weights, 2))
    assert depth == pytest.approx(2 / 3) and rand == pytest.approx(0.7111, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lowest_layer_much_higher_than_random_at_model_scale(seed):
    """30 layers, 7 active, importance weights sigmoid(-s) with |s| <= 2.5, default window."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.sigmoid(-(torch.rand(30, generator=g, dtype=torch.float64) * 5 - 2.5))
    n = 2000
    depth = sum(sample_depth_aware(weights, 7, g)[0] for _ in range(n)) / n
    rand = sum(sample_layers(weights, 7, g)[0] for _ in range(n)) / n
    assert depth > 2 * rand


def test_sampler_matches_its_exact_distribution():
    weights = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0, 1.5], dtype=torch.float64)
    dist = exact_depth_aware(weights.tolist(), 2, 4)
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts: dict[frozenset, int] = {}
    for _ in range(n):
        key = frozenset(sample_depth_aware(weights, 2, g, 4))
        counts[key] = counts.get(key, 0) + 1
    for key, prob in dist.items():
        assert abs(counts.get(key, 0) / n - prob) < 4 * math.sqrt(prob * (1 - prob) / n) + 1e-3


def test_default_window_is_twice_k_and_bad_windows_raise():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        picked = sample_depth_aware(torch.ones(20), 3, g)
        assert max(picked) - min(picked) < 6
    with pytest.raises(ValueError, match="Invalid window: 2"):
        sample_depth_aware(torch.ones(8), 3, g, window=2)
    with pytest.raises(ValueError, match="cannot draw k=9"):
        sample_depth_aware(torch.ones(8), 9, g)


@given(st.integers(1, 30), st.data())
def test_depth_window_holds_the_anchor_and_k_layers(num_layers, data):
    k = data.draw(st.integers(1, num_layers))
    window = data.draw(st.integers(k, num_layers))
    anchor = data.draw(st.integers(0, num_layers - 1))
    offset = data.draw(st.integers(0, window - 1))
    span = depth_window(anchor, offset, num_layers, k, window)
    assert anchor in span
    assert k <= len(span) <= window
    assert span.start >= 0 and span.stop <= num_layers


# ---------------------------------------------------------------- spread diagnostics
@given(st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=30))
def test_spread_is_at_least_uniform(weights):
    spread = distribution_spread(torch.tensor(weights, dtype=torch.float64))
    assert spread["max_min_ratio"] >= 1.0
    assert 0.0 <= spread["kl_from_uniform"] <= math.log(len(weights)) + 1e-9
    assert 0.0 <= spread["entropy_ratio"] <= 1.0 + 1e-9
    ratio = max(weights) / min(weights)
    assert spread["max_min_ratio"] == pytest.approx(ratio, rel=1e-6)


def test_spread_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        distribution_spread(torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="1-D"):
        distribution_spread(torch.ones(2, 2))


# ---------------------------------------------------------------- optimizer wiring
@pytest.mark.parametrize("skip_backward", [False, True])
def test_backward_stops_at_the_lowest_active_layer(skip_backward):
    """With freeze_inactive and LoRA, nothing below the lowest active layer requires grad,
    so autograd stops there by itself (skip_backward=False); the explicit cut agrees."""
    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, active_layers=2, seed=0,
                       skip_backward=skip_backward)
    blocks = list(model.base_model.model.model.layers)
    for active in ([3, 5], [1, 4], [0, 2]):
        opt.set_active_layers(active)
        reached: list[int] = []

        def record(_m, _a, out, i, seen=reached):
            if (out[0] if isinstance(out, tuple) else out).requires_grad:
                seen.append(i)

        handles = [b.register_forward_hook(partial(record, i=i)) for i, b in enumerate(blocks)]
        model(**lm_batch()).loss.backward()
        for h in handles:
            h.remove()
        assert reached == list(range(min(active), 6))
        opt.zero_grad()


def test_depth_aware_optimizer_runs_rounds_and_clusters_layers():
    model = lora_model(12)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.01, sampling="depth-aware", active_layers=2,
                       estimator="normalized", update_interval=2, seed=0)
    spans = []
    for step in range(6):
        spans.append(max(opt.active_layers) - min(opt.active_layers))
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert max(spans) < 4  # window = 2 * active_layers
    assert opt.last_round is not None and opt.scores.abs().sum() > 0
