"""Importance rounds (``ist_optim.importance.rounds``): the estimator interface (three
members, the rest optional), the read-only sampler a round measures with, and one-line
errors for what a round cannot measure."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, lora_model
from torch import nn

from ist_optim import ISTConfig, ISTOptimizer, LayerSampler
from ist_optim.importance.rounds import ImportanceRound, RoundContext
from ist_optim.registry import register_estimator


class _Spread(ImportanceRound):
    """An estimator of three members: every layer a singleton set, its "loss" its index."""

    name = "test-rounds-spread"
    seen: list = []

    def measure(self, sampler):
        self.seen.append(sampler)
        layers = list(range(sampler.num_layers))
        return [[i] for i in layers], torch.tensor(layers, dtype=torch.float64)

    def update(self, scores, sets, losses):
        return scores + 0.1 * (losses - losses.mean())


register_estimator(_Spread)


def test_an_estimator_of_name_measure_and_update_trains():
    """No build(), no hooks, no state of its own: the defaults cover them, and it saves
    and resumes like the built-in ones."""
    blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
    model = nn.Sequential(*blocks)
    opt = ISTOptimizer(torch.optim.SGD, model, layers=list(blocks), lr=0.1, seed=0,
                       estimator="test-rounds-spread", update_interval=1)
    for _ in range(2):
        model(torch.randn(2, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.scores.tolist() == pytest.approx([-0.3, -0.1, 0.1, 0.3])
    assert opt.state_dict()["ist"]["rounds"] == {"estimator": "test-rounds-spread",
                                                 "skipped_rounds": 0}
    opt.close()


def test_measure_gets_a_read_only_view_of_the_sampler():
    _Spread.seen.clear()
    sampler = LayerSampler.from_config(ISTConfig(active_layers=1), 3, seed=0)
    round_ = _Spread.build(RoundContext(ISTConfig(), 1, None, nn.Linear(1, 1), [], None,
                                        None, None, torch.device("cpu")))
    round_.run(sampler)
    view = _Spread.seen[-1]
    with pytest.raises(AttributeError):
        view.set_scores(torch.zeros(3))
    with pytest.raises(AttributeError):
        view.scores = torch.zeros(3)
    assert sampler.scores.tolist() == pytest.approx([-0.1, 0.0, 0.1])  # run() wrote them


def test_an_estimator_without_measure_or_update_says_which_is_missing():
    class Half(ImportanceRound):
        name = "test-rounds-half"

    sampler = LayerSampler.from_config(ISTConfig(active_layers=1), 3, seed=0)
    with pytest.raises(NotImplementedError, match="'test-rounds-half' does not define measure"):
        Half(ISTConfig(), 1, None).run(sampler)
    with pytest.raises(NotImplementedError, match="does not define update"):
        Half(ISTConfig(), 1, None).update(torch.zeros(3), [[0]], torch.zeros(1))


def test_optional_hooks_default_to_nothing_or_a_one_line_refusal():
    round_ = _Spread(ISTConfig(), 1, None)
    round_.end_step()
    round_.discard_step()
    round_.remove()
    with pytest.raises(ValueError, match="runs no estimation forward passes"):
        round_.set_batches([], 0)
    with pytest.raises(ValueError, match="measures no suppressed losses"):
        round_.suppressed_losses([[0]], None)


def test_loss_fn_returning_a_non_scalar_names_the_fix():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=1e-3, seed=0, update_interval=1,
                       loss_fn=lambda m, b: torch.ones(4))
    model(**lm_batch()).loss.backward()
    with pytest.raises(ValueError, match=r"loss_fn returned a tensor of shape \(4,\).*mean"):
        opt.step()


def test_loss_fn_returning_a_non_number_names_the_fix():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=1e-3, seed=0, update_interval=1,
                       loss_fn=lambda m, b: "loss")
    model(**lm_batch()).loss.backward()
    with pytest.raises(TypeError, match="loss_fn returned a str"):
        opt.step()


def test_empty_importance_batches_refused_at_construction():
    with pytest.raises(ValueError, match="importance_batches is empty"):
        ISTOptimizer(torch.optim.SGD, lora_model(4), lr=1e-3, importance_batches=[])
