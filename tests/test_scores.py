"""The score update matches the paper's formula."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from ist_optim.importance.paper import paper_advantages
from ist_optim.importance.scores import membership_matrix, score_update


def loop_update(scores, sets, losses, eta):
    """The paper's formula written as plainly as possible."""
    p = [1 / (1 + math.exp(-s)) for s in scores]
    rewards = [math.exp(-lk) for lk in losses]
    mean = sum(rewards) / len(rewards)
    adv = [r - mean for r in rewards]
    new = list(scores)
    for i in range(len(scores)):
        total = sum(a for a, members in zip(adv, sets, strict=True) if i in members)
        new[i] = scores[i] + eta * total * p[i] * (1 - p[i])
    return new


@given(st.integers(2, 12), st.integers(2, 5), st.data())
def test_score_update_matches_formula(num_layers, k, data):
    scores = data.draw(st.lists(st.floats(-5, 5), min_size=num_layers, max_size=num_layers))
    sets = [sorted(data.draw(st.sets(st.integers(0, num_layers - 1), min_size=1)))
            for _ in range(k)]
    losses = data.draw(st.lists(st.floats(0.0, 10.0), min_size=k, max_size=k))
    eta = data.draw(st.floats(0.0, 100.0))
    got = score_update(torch.tensor(scores, dtype=torch.float64), sets,
                       paper_advantages(torch.tensor(losses)), eta)
    assert torch.allclose(got, torch.tensor(loop_update(scores, sets, losses, eta),
                                            dtype=torch.float64), atol=1e-9)


@given(st.integers(2, 10), st.floats(0, 10))
def test_equal_losses_change_nothing(num_layers, loss):
    scores = torch.linspace(-1, 1, num_layers, dtype=torch.float64)
    adv = paper_advantages(torch.full((3,), loss))
    assert adv.abs().max() < 1e-15
    assert torch.allclose(score_update(scores, [[0], [1], [0, 1]], adv, 10.0), scores,
                          rtol=0, atol=1e-13)


def test_suppressing_a_harmless_set_raises_its_score():
    scores = torch.zeros(4, dtype=torch.float64)
    # set [0, 1] suppressed -> low loss (harmless); set [2, 3] -> high loss (important)
    new = score_update(scores, [[0, 1], [2, 3]], paper_advantages(torch.tensor([1.0, 3.0])), 10)
    assert new[0] > 0 and new[1] > 0 and new[2] < 0 and new[3] < 0


def test_membership_matrix():
    m = membership_matrix([[0, 2], [1]], 3)
    assert m.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
