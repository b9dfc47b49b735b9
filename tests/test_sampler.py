"""LayerSampler: draws from its own state, and a checkpoint entry it validates fully."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ist_optim import ISTConfig, LayerSampler


def make_sampler(num_layers: int, k: int, sampling: str, seed: int, **options) -> LayerSampler:
    config = ISTConfig(active_layers=k, sampling=sampling, **options)
    return LayerSampler.from_config(config, num_layers, seed)


@given(num_layers=st.integers(2, 24), seed=st.integers(0, 2**31 - 1),
       sampling=st.sampled_from(["importance", "uniform", "depth-aware"]), data=st.data())
def test_state_round_trip_reproduces_the_draws(num_layers, seed, sampling, data):
    k = data.draw(st.integers(1, num_layers))
    a = make_sampler(num_layers, k, sampling, seed)
    a.set_scores(torch.linspace(-1, 1, num_layers, dtype=torch.float64))
    a.draw_next()
    b = make_sampler(num_layers, k, sampling, seed + 1)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        drawn = a.draw_active()
        assert drawn == b.draw_active()
        assert len(set(drawn)) == k and all(0 <= i < num_layers for i in drawn)
    assert b.fingerprint() == a.fingerprint()


@given(num_layers=st.integers(2, 12), junk=st.one_of(
    st.none(), st.text(max_size=3), st.integers(), st.lists(st.integers(-3, 20), max_size=4)))
def test_check_state_refuses_malformed_active_sets_and_scores(num_layers, junk):
    sampler = make_sampler(num_layers, 1, "uniform", 0)
    sampler.set_active([0])
    state = sampler.state_dict()
    valid = (isinstance(junk, list) and junk and len(set(junk)) == len(junk)
             and all(0 <= i < num_layers for i in junk))
    bad = dict(state, active_layers=junk)
    if valid:
        sampler.check_state(bad)
    else:
        with pytest.raises(ValueError, match="active_layers"):
            sampler.check_state(bad)
    with pytest.raises(ValueError, match="scores"):
        sampler.check_state(dict(state, scores=junk))
    assert sampler.active == [0]  # checking changes nothing


def test_bad_depth_window_is_named():
    with pytest.raises(ValueError, match="depth_window: 9"):
        make_sampler(8, 2, "depth-aware", 0, depth_window=9)


def test_depth_window_is_used():
    sampler = make_sampler(16, 2, "depth-aware", 0, depth_window=2)
    for _ in range(20):
        low, high = sampler.draw_active()
        assert high - low == 1  # a window of 2 holds two adjacent layers
