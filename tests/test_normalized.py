"""The ``"normalized"`` estimator's math (ist_optim/importance/normalized.py): the running
scale, standardized advantages, retained scores."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ist_optim.importance.normalized import (
    ADVANTAGE_SCALE,
    SCORE_RETENTION,
    RunningScale,
    check_scale_state,
    normalized_advantages,
    normalized_score_update,
)

finite = st.floats(-50.0, 50.0, allow_nan=False)
loss_lists = st.lists(finite, min_size=2, max_size=8)


@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=20))
def test_running_scale_is_at_least_the_round_spread(spreads):
    scale = RunningScale()
    for i, sigma in enumerate(spreads):
        c = scale.update(sigma)
        assert c >= sigma
        if i == 0:
            assert scale.value == sigma
    copy = RunningScale()
    copy.load_state_dict(scale.state_dict())
    assert copy == scale


def test_running_scale_rejects_bad_spread():
    with pytest.raises(ValueError, match="finite"):
        RunningScale().update(math.nan)


@given(loss_lists)
def test_normalized_advantages_are_centered_and_bounded(losses):
    t = torch.tensor(losses, dtype=torch.float64)
    adv = normalized_advantages(t, RunningScale())
    k = len(losses)
    assert abs(float(adv.sum())) < 1e-9
    assert float(adv.pow(2).sum()) <= k * ADVANTAGE_SCALE**2 + 1e-9
    if float(t.max() - t.min()) > 1e-6:
        assert float(adv[int(t.argmin())]) >= float(adv.max()) - 1e-12


@given(loss_lists, st.floats(0.01, 100.0), st.floats(-100.0, 100.0))
def test_normalized_advantages_do_not_depend_on_loss_level_or_scale(losses, a, b):
    t = torch.tensor(losses, dtype=torch.float64)
    assume(float(t.std()) >= 1e-3)  # equal losses: see the test below
    first = normalized_advantages(t, RunningScale())
    moved = normalized_advantages(a * t + b, RunningScale())
    assert torch.allclose(first, moved, atol=1e-6)


def test_normalized_advantages_zero_for_equal_losses():
    for value in (2.5, 0.1):  # 0.1: the mean differs from each loss by rounding only
        assert normalized_advantages(torch.full((3,), value), RunningScale()).abs().max() == 0


def test_quiet_round_moves_less_than_a_loud_one():
    scale = RunningScale()
    loud = normalized_advantages(torch.tensor([1.0, 2.0, 3.0]), scale)
    quiet = normalized_advantages(torch.tensor([1.0, 1.01, 1.02]), scale)
    assert quiet.abs().max() < 0.1 * loud.abs().max()


def test_normalized_score_update_matches_documented_formula():
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    sets = [[0, 1], [1, 2], [3, 0]]
    losses = torch.tensor([3.0, 3.4, 2.9], dtype=torch.float64)
    scale = RunningScale(value=0.5, rounds=4)
    got = normalized_score_update(scores, sets, losses, scale, 10.0)
    # by hand, from the module docstring
    mean = losses.mean()
    sigma = math.sqrt(float(((losses - mean) ** 2).mean()))
    m = 0.9 * 0.5 + 0.1 * sigma
    c = max(sigma, m)
    adv = 0.1 * (mean - losses) / c
    kept = 0.9 * scores
    p = torch.sigmoid(kept)
    expected = kept.clone()
    for k, members in enumerate(sets):
        for i in members:
            expected[i] += 10.0 * adv[k] * p[i] * (1 - p[i])
    assert torch.allclose(got, expected, atol=1e-12)
    assert scale.rounds == 5 and math.isclose(scale.value, m)


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=6), st.integers(1, 50))
@settings(max_examples=30)
def test_normalized_scores_stay_bounded(start, rounds):
    bound = 10.0 * ADVANTAGE_SCALE * 3 / (4 * (1 - SCORE_RETENTION))
    g = torch.Generator().manual_seed(rounds)
    scores = torch.tensor(start, dtype=torch.float64).clamp(-bound, bound)
    n = scores.numel()
    scale = RunningScale()
    for _ in range(rounds):
        sets = [sorted(torch.randperm(n, generator=g)[: max(1, n // 2)].tolist()) for _ in range(3)]
        losses = torch.rand(3, generator=g, dtype=torch.float64) * 1e-3
        scores = normalized_score_update(scores, sets, losses, scale, 10.0)
        assert scores.abs().max() <= bound + 1e-9


@given(st.integers(2, 30), st.integers(1, 60), st.integers(0, 1000))
@settings(max_examples=30)
def test_first_order_style_scores_stay_bounded(num_layers, rounds, seed):
    """Singleton sets (one per reached layer): bound eta tau sqrt(n-1) / (4 (1 - rho))."""
    bound = 10.0 * ADVANTAGE_SCALE * math.sqrt(num_layers - 1) / (4 * (1 - SCORE_RETENTION))
    g = torch.Generator().manual_seed(seed)
    scores = torch.zeros(num_layers, dtype=torch.float64)
    scale = RunningScale()
    sets = [[i] for i in range(num_layers)]
    for _ in range(rounds):
        deltas = torch.randn(num_layers, generator=g, dtype=torch.float64).pow(3)
        scores = normalized_score_update(scores, sets, deltas, scale, 10.0)
        assert scores.abs().max() <= bound + 1e-9


def test_scale_state_round_trips_and_a_malformed_one_is_named():
    scale = RunningScale(decay=0.5)
    scale.update(2.0)
    other = RunningScale()
    other.load_state_dict(scale.state_dict())
    assert other == scale
    check_scale_state({})
    check_scale_state({"scale": scale.state_dict()})
    with pytest.raises(ValueError, match="entry 'scale' is .*'decay', 'value' and 'rounds'"):
        check_scale_state({"scale": {"decay": 0.5}})
