"""Extension points: sampling rules and estimators registered by name (docs/extending.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import lm_batch, lora_model, params_snapshot, train_steps

from ist_optim import (
    ISTConfig,
    ISTOptimizer,
    SamplingRule,
    register_estimator,
    register_sampling_rule,
)
from ist_optim.importance.rounds import ImportanceRound
from ist_optim.registry import estimator_names, sampling_rule, sampling_rule_names

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grad_norm_sampling.py"


@pytest.fixture(scope="module")
def grad_norm():
    """The worked example of docs/extending.md, imported as a user would."""
    spec = importlib.util.spec_from_file_location("grad_norm_sampling", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_worked_example_registers_and_trains(grad_norm, capsys):
    assert "grad-norm" in sampling_rule_names()
    assert sampling_rule("grad-norm") is grad_norm.GradNormRule
    opt = grad_norm.main(["--steps", "20"])
    assert "draw probabilities" in capsys.readouterr().out
    assert opt.rounds is None  # runs_rounds = False: no importance rounds
    norms = opt.sampler.rule.norms
    assert (norms != 1.0).sum() >= 2  # the layers that trained were observed
    assert torch.allclose(opt.sampling_probabilities.double(), (norms / norms.sum()).float()
                          .double(), atol=1e-6)


def test_a_rules_state_is_in_the_checkpoint_and_resume_is_exact(grad_norm):
    kwargs = {"lr": 1e-2, "seed": 2, "active_layers": 2, "sampling": "grad-norm"}
    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, **kwargs)
    sets = train_steps(model, opt, 8)
    final = params_snapshot(model)

    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, **kwargs)
    first = train_steps(model, opt, 4)
    saved, weights = opt.state_dict(), params_snapshot(model)
    assert torch.equal(saved["ist"]["sampler"]["rule"]["norms"], opt.sampler.rule.norms)
    model = lora_model(6)
    model.load_state_dict(weights)
    opt = ISTOptimizer(torch.optim.AdamW, model, **dict(kwargs, seed=7))
    opt.load_state_dict(saved)
    assert first + train_steps(model, opt, 4, start=4) == sets
    for name, value in params_snapshot(model).items():
        assert torch.equal(final[name], value), name
    bad = dict(saved, ist={**saved["ist"], "sampler": {**saved["ist"]["sampler"],
                                                       "rule": {"norms": torch.ones(2)}}})
    with pytest.raises(ValueError, match="grad-norm rule state"):
        opt.load_state_dict(bad)


def test_built_in_rules_observe_nothing_and_save_no_rule_state():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    train_steps(model, opt, 2)
    assert not opt.sampler.rule.observes_gradients
    assert "rule" not in opt.state_dict()["ist"]["sampler"]


def test_names_are_unique_and_required():
    class Again(SamplingRule):
        name = "uniform"

    class Nameless(SamplingRule):
        pass

    with pytest.raises(ValueError, match="'uniform' is already registered"):
        register_sampling_rule(Again)
    with pytest.raises(ValueError, match="has no name"):
        register_sampling_rule(Nameless)
    with pytest.raises(ValueError, match=r"Invalid sampling: 'nope'; expected one of \("
                                         r"'importance', 'uniform', 'depth-aware'"):
        ISTConfig(sampling="nope")


class _LastStepLoss(ImportanceRound):
    """A test estimator: every layer a singleton set, the "loss" its index (so the paper's
    update ranks the layers by index), no batches, no hooks: the three members
    docs/extending.md walks through, the defaults for the rest (build() included)."""

    name = "test-index"

    def measure(self, sampler):  # a read-only SamplerView
        return ([[i] for i in range(sampler.num_layers)],
                torch.arange(sampler.num_layers, dtype=torch.float64))

    def update(self, scores, sets, losses):
        return scores + 0.1 * (losses - losses.mean())


def test_a_registered_estimator_runs_its_rounds():
    if "test-index" not in estimator_names():
        register_estimator(_LastStepLoss)
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, estimator="test-index",
                       update_interval=2)
    train_steps(model, opt, 4)
    assert opt.last_round["step"] == 4
    assert torch.allclose(opt.scores, torch.tensor([-0.3, -0.1, 0.1, 0.3],
                                                   dtype=torch.float64))
    with pytest.raises(ValueError, match="estimator='test-index' runs no estimation forward"):
        ISTOptimizer(torch.optim.AdamW, lora_model(4), lr=1e-2, estimator="test-index",
                     importance_batches=[lm_batch()])
    with pytest.raises(ValueError, match="measures no suppressed losses"):
        opt.measure_suppressed_losses([[0]], lm_batch())
