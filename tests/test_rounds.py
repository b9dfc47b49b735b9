"""Importance rounds (``ist_optim.importance.rounds``): collectives before decisions, and one-line
errors for what a round cannot measure."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, lora_model
from torch import nn

import ist_optim.importance.rounds as rounds_module
from ist_optim import ISTOptimizer


def test_first_order_round_reduces_before_deciding_to_skip(monkeypatch):
    calls = []

    def recording_average(values, group):
        calls.append(values.clone())
        return values.detach().to(torch.float64).cpu()

    monkeypatch.setattr(rounds_module, "average_across_ranks", recording_average)
    blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
    model = nn.Sequential(*blocks)
    opt = ISTOptimizer(torch.optim.SGD, model, layers=list(blocks), active_layers=1,
                       estimator="first-order", update_interval=1, seed=0, lr=0.1)
    x = torch.randn(2, 3)
    # only the top layer active and reached: one layer, no update, but the collective ran
    opt.set_active_layers([3])
    model(x).pow(2).sum().backward()
    opt.step()
    assert len(calls) == 1 and calls[0].numel() == 2 * 4  # per-layer sums and counts
    assert opt.last_round is None


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
