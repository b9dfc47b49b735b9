"""Property tests for the pure sampling functions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ist_optim.sampling.draws import (
    resolve_count,
    sample_candidate_sets,
    sample_layers,
    sampling_weights,
)

weights_st = st.lists(st.floats(0.01, 100.0), min_size=1, max_size=40).map(
    lambda ws: torch.tensor(ws, dtype=torch.float64)
)


@given(weights_st, st.data(), st.integers(0, 2**31 - 1))
def test_sample_layers_returns_k_distinct_valid_sorted(weights, data, seed):
    k = data.draw(st.integers(1, weights.numel()))
    picked = sample_layers(weights, k, torch.Generator().manual_seed(seed))
    assert len(picked) == k
    assert len(set(picked)) == k
    assert all(0 <= i < weights.numel() for i in picked)
    assert picked == sorted(picked)


@given(weights_st, st.data(), st.integers(0, 2**31 - 1))
def test_sample_layers_is_seed_deterministic(weights, data, seed):
    k = data.draw(st.integers(1, weights.numel()))
    a = [sample_layers(weights, k, g) for g in [torch.Generator().manual_seed(seed)] * 3]
    b = [sample_layers(weights, k, g) for g in [torch.Generator().manual_seed(seed)] * 3]
    assert a == b


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=2, max_size=6), st.integers(0, 1000))
def test_single_draw_frequencies_follow_weights(ws, seed):
    weights = torch.tensor(ws, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    n = 4000
    counts = torch.zeros(len(ws))
    for _ in range(n):
        counts[sample_layers(weights, 1, g)[0]] += 1
    expected = weights / weights.sum() * n
    # 5 standard deviations of a binomial count: fails only on a real bias.
    sd = (expected * (1 - weights / weights.sum())).sqrt()
    assert ((counts - expected).abs() <= 5 * sd + 1).all(), (counts, expected)


def test_without_replacement_inclusion_favours_heavier_layers():
    weights = torch.tensor([1.0, 1.0, 1.0, 8.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(2000):
        counts[sample_layers(weights, 2, g)] += 1
    assert counts[3] > 1800  # drawn in almost every pair
    assert counts[:3].min() > 0  # the light layers stay reachable


def test_sampling_does_not_touch_global_rng():
    state = torch.random.get_rng_state()
    sample_layers(torch.ones(10), 3, torch.Generator().manual_seed(1))
    sample_candidate_sets(torch.ones(10), 5, 3, torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.random.get_rng_state())


@given(st.integers(1, 12), st.data(), st.integers(1, 5), st.integers(0, 10_000))
def test_candidate_sets_are_distinct(num_layers, data, num_sets, seed):
    size = data.draw(st.integers(1, num_layers))
    sets = sample_candidate_sets(torch.ones(num_layers), size, num_sets,
                                 torch.Generator().manual_seed(seed))
    assert len({tuple(s) for s in sets}) == len(sets)
    assert 1 <= len(sets) <= min(num_sets, math.comb(num_layers, size))
    assert all(len(s) == size for s in sets)


@given(st.integers(1, 200), st.floats(1e-6, 1.0))
def test_resolve_count_fraction(num_layers, frac):
    count = resolve_count(frac, num_layers, "active_layers")
    assert 1 <= count <= num_layers
    assert count == max(1, int(frac * num_layers))


@given(st.integers(1, 200), st.data())
def test_resolve_count_int(num_layers, data):
    k = data.draw(st.integers(1, num_layers))
    assert resolve_count(k, num_layers, "x") == k


@pytest.mark.parametrize("value", [0, -1, 9, 0.0, 1.5, -0.2, float("nan")])
def test_resolve_count_rejects_out_of_range(value):
    with pytest.raises(ValueError, match="active_layers"):
        resolve_count(value, 8, "active_layers")


@pytest.mark.parametrize("value", [True, "0.25", None])
def test_resolve_count_rejects_non_numbers(value):
    with pytest.raises(TypeError, match="active_layers"):
        resolve_count(value, 8, "active_layers")


@given(st.lists(st.floats(-800, 800), min_size=1, max_size=20))
def test_sampling_weights_positive_and_ordered(scores):
    s = torch.tensor(scores, dtype=torch.float64)
    w = sampling_weights(s, -1.0)
    assert (w > 0).all() and torch.isfinite(w).all()
    ordered = w[torch.argsort(s)]
    # higher score -> lower training weight, up to the rounding of torch.sigmoid (its
    # vectorised and scalar paths differ by an ulp: 1.8080e-35 then 1.8080e-35 + 2.7e-51)
    assert (ordered.diff() <= 4 * torch.finfo(torch.float64).eps * ordered[:-1]).all()
