"""The ``"paper"`` estimator (ist_optim/importance/paper.py): its advantage and its round's
update are the paper's formula."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st
from test_scores import loop_update

from ist_optim import ISTConfig
from ist_optim.importance.paper import PaperRound, paper_advantages

losses = st.lists(st.floats(-20.0, 20.0, allow_nan=False), min_size=1, max_size=8)


@given(losses)
def test_advantages_are_rewards_minus_their_mean(values):
    advantages = paper_advantages(torch.tensor(values, dtype=torch.float64))
    rewards = [math.exp(-v) for v in values]
    mean = sum(rewards) / len(rewards)
    assert advantages.dtype == torch.float64
    for got, reward in zip(advantages.tolist(), rewards, strict=True):
        assert math.isclose(got, reward - mean, rel_tol=1e-9, abs_tol=1e-9 * max(rewards))


def test_a_lower_loss_gets_a_positive_advantage():
    assert paper_advantages(torch.tensor([1.0, 2.0])).tolist()[0] > 0


@given(st.integers(2, 8), st.data())
def test_the_round_updates_scores_by_the_papers_formula(num_layers, data):
    scores = data.draw(st.lists(st.floats(-3, 3), min_size=num_layers, max_size=num_layers))
    sets = data.draw(st.lists(st.lists(st.integers(0, num_layers - 1), min_size=1,
                                       max_size=num_layers, unique=True),
                              min_size=2, max_size=4))
    measured = data.draw(st.lists(st.floats(0, 8), min_size=len(sets), max_size=len(sets)))
    round_ = PaperRound.__new__(PaperRound)  # update() reads only the config
    round_.config = ISTConfig(score_lr=7.0)
    new = round_.update(torch.tensor(scores, dtype=torch.float64), sets,
                        torch.tensor(measured, dtype=torch.float64))
    expected = loop_update(scores, sets, measured, 7.0)
    for got, want in zip(new.tolist(), expected, strict=True):
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
