"""The optimizer's read-only views (ist_optim/views.py): each reads the one part that owns
the fact, and the names say what they hold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ist_optim import ISTOptimizer, MemoryBudget


def _net(num_layers: int = 6) -> tuple[nn.Sequential, list[nn.Module]]:
    blocks = [nn.Linear(4, 4) for _ in range(num_layers)]
    return nn.Sequential(*blocks), blocks


def _step(model: nn.Module, opt: ISTOptimizer) -> None:
    model(torch.randn(2, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_num_active_is_the_configured_count_and_num_trained_the_coming_steps():
    model, blocks = _net(6)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, layers=blocks, active_layers=2,
                       dense_steps=1, sampling="uniform", seed=0)
    assert opt.num_active == 2
    assert opt.num_trained == len(opt.active_layers) == 6  # the dense step
    assert "active_layers=2, trained_next=6" in repr(opt)
    _step(model, opt)
    assert opt.num_active == 2 and opt.num_trained == len(opt.active_layers) == 2
    assert "active_layers=2, trained_next=2" in repr(opt)


def test_the_active_set_is_the_activators_record():
    model, blocks = _net(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, layers=blocks, active_layers=1, seed=0)
    opt.set_active_layers([3])
    assert opt.active_layers == opt.activator.active == [3]
    assert opt.fingerprint()["active_layers"] == [3]
    assert not hasattr(opt.sampler, "active")  # one owner
    listed = opt.active_layers
    listed.append(0)  # a copy
    assert opt.active_layers == [3]


def test_budget_policy_is_the_object_and_memory_budget_its_alias():
    model, blocks = _net(4)
    plain = ISTOptimizer(torch.optim.SGD, model, lr=0.1, layers=blocks, seed=0)
    assert plain.budget_policy is None and plain.memory_budget is None
    plain.close()
    from transformers import LlamaConfig

    from ist_optim import MemoryPlanner
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, vocab_size=64)
    planner = MemoryPlanner(config, batch_size=2, seq_len=8, dtype=torch.float32)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, layers=blocks, seed=0,
                       memory_budget="1GiB", memory_planner=planner)
    assert isinstance(opt.budget_policy, MemoryBudget)
    assert opt.memory_budget is opt.budget_policy
    assert opt.config.memory_budget == "1GiB" and opt.config.memory_budget_bytes == 2**30
    assert opt.budget_policy.policy.budget == opt.config.memory_budget_bytes
    opt.close()


def test_layers_scores_and_rounds_views():
    model, blocks = _net(3)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, layers=blocks, seed=5,
                       sampling="uniform")
    assert opt.num_layers == 3 and opt.layer_names == ["0", "1", "2"]
    assert opt.groups is opt.layer_groups
    assert opt.seed == 5 and opt.num_steps == 0 and opt.skipped_steps == 0
    assert not opt.runs_importance_rounds and opt.last_round is None
    assert opt.skipped_rounds == 0 and opt.update_interval == opt.config.update_interval
    assert opt.state_policy == "keep"
    opt.sampler.set_scores(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    assert torch.equal(opt.importance, torch.tensor([-1.0, 0.0, 1.0]))
    scores = opt.scores
    scores.zero_()  # a copy
    assert opt.scores.tolist() == [1.0, 0.0, -1.0]
    assert opt.sampling_probabilities.sum().item() == pytest.approx(1.0)
    assert opt.sampling_spread()["max_min_ratio"] == pytest.approx(1.0)  # uniform weights
