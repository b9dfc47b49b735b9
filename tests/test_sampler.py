"""LayerSampler: draws from its own state, a checkpoint entry it validates fully and that
names its rule, and the read-only view importance rounds get."""

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
    a.draw_active()
    b = make_sampler(num_layers, k, sampling, seed + 1)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        drawn = a.draw_active()
        assert drawn == b.draw_active()
        assert len(set(drawn)) == k and all(0 <= i < num_layers for i in drawn)
    assert b.fingerprint() == a.fingerprint()


@given(num_layers=st.integers(2, 12), junk=st.one_of(
    st.none(), st.text(max_size=3), st.integers(), st.lists(st.integers(-3, 20), max_size=4)))
def test_check_state_refuses_malformed_scores_and_changes_nothing(num_layers, junk):
    sampler = make_sampler(num_layers, 1, "uniform", 0)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="scores"):
        sampler.check_state(dict(state, scores=junk))
    assert torch.equal(sampler.scores, torch.zeros(num_layers, dtype=torch.float64))


@pytest.mark.parametrize("saved, here", [("uniform", "importance"), ("importance", "uniform"),
                                         ("depth-aware", "importance")])
def test_a_checkpoint_of_another_rule_is_refused_in_one_line(saved, here):
    state = make_sampler(6, 2, saved, 0).state_dict()
    assert state["sampling"] == saved
    sampler = make_sampler(6, 2, here, 1)
    with pytest.raises(ValueError) as info:
        sampler.load_state_dict(state)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"checkpoint was saved with sampling={saved!r}, this optimizer uses "
                       f"sampling={here!r}; build it with sampling={saved!r}")
    assert sampler.seed == 1 and sampler.num_steps == 0  # nothing loaded


def test_a_checkpoint_without_the_rule_name_loads_into_any_rule():
    """Checkpoints written before the rule was recorded have no "sampling" key."""
    state = make_sampler(6, 2, "uniform", 0).state_dict()
    state["num_steps"] = 3
    del state["sampling"]
    sampler = make_sampler(6, 2, "importance", 1)
    sampler.load_state_dict(state)
    assert sampler.num_steps == 3 and sampler.seed == 0


def test_the_view_reads_the_sampler_and_cannot_write_it():
    sampler = make_sampler(6, 2, "importance", 0)
    view = sampler.view()
    sampler.set_scores(torch.arange(6, dtype=torch.float64))
    sampler.advance()
    assert (view.num_layers, view.num_active, view.num_steps, view.sampling) == (
        6, 2, 1, "importance")
    assert torch.equal(view.scores, sampler.scores)
    view.scores.zero_()  # a copy
    assert torch.equal(sampler.scores, torch.arange(6, dtype=torch.float64))
    assert torch.equal(view.probabilities(), sampler.probabilities())
    for name in ("scores", "num_steps", "num_layers"):
        with pytest.raises(AttributeError):
            setattr(view, name, 0)
    with pytest.raises(AttributeError):
        view.set_scores  # noqa: B018
    twin = make_sampler(6, 2, "importance", 0)
    twin.set_scores(torch.arange(6, dtype=torch.float64))
    assert view.draw_candidates(2, 3) == twin.draw_candidates(2, 3)  # the private generator


def test_bad_depth_window_is_named():
    with pytest.raises(ValueError, match="depth_window: 9"):
        make_sampler(8, 2, "depth-aware", 0, depth_window=9)


def test_depth_window_is_used():
    sampler = make_sampler(16, 2, "depth-aware", 0, depth_window=2)
    for _ in range(20):
        low, high = sampler.draw_active()
        assert high - low == 1  # a window of 2 holds two adjacent layers
