"""The ``"first-order"`` estimator (ist_optim/importance/first_order.py): predicted
suppression deltas, the probe that reads the training backward, and its round."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import lm_batch, lora_model, tiny_llama
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ist_optim.importance.first_order as first_order_module
from ist_optim import ISTOptimizer, Suppressor
from ist_optim.importance.first_order import FirstOrderProbe, predicted_suppression_deltas


@given(st.lists(st.tuples(st.floats(-10, 10), st.integers(0, 5)), min_size=1, max_size=8),
       st.floats(0.0, 0.99))

def test_predicted_deltas_are_means_times_lambda_minus_one(pairs, lam):
    sums = torch.tensor([s for s, _ in pairs], dtype=torch.float64)
    counts = torch.tensor([c for _, c in pairs], dtype=torch.int64)
    reached, deltas = predicted_suppression_deltas(sums, counts, lam)
    assert reached == [i for i, (_, c) in enumerate(pairs) if c > 0]
    for j, i in enumerate(reached):
        assert math.isclose(float(deltas[j]), (lam - 1) * pairs[i][0] / pairs[i][1],
                            rel_tol=1e-9, abs_tol=1e-12)


def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model.base_model.model.model.layers)


def test_probe_equals_lora_parameter_identity():
    """For LoRA, <dL/dy, y> = <grad_B, B> = <grad_A, A>, layer by layer."""
    model = lora_model(4)
    probe = FirstOrderProbe(_layers(model), "adapters")
    model(**lm_batch()).loss.backward()
    probe.end_step()
    sums, counts = probe.take()
    assert counts.tolist() == [1, 1, 1, 1]
    for i, block in enumerate(_layers(model)):
        by_b = sum(float((p.grad * p).sum()) for n, p in block.named_parameters() if "lora_B" in n)
        by_a = sum(float((p.grad * p).sum()) for n, p in block.named_parameters() if "lora_A" in n)
        assert math.isclose(float(sums[i]), by_b, rel_tol=1e-4, abs_tol=1e-7)
        assert math.isclose(float(sums[i]), by_a, rel_tol=1e-4, abs_tol=1e-7)
    probe.remove()


@pytest.mark.parametrize("mode", ["adapters", "residual"])
def test_probe_matches_finite_difference_suppression(mode):
    model = lora_model(4) if mode == "adapters" else tiny_llama(4)
    blocks = _layers(model) if mode == "adapters" else list(model.model.layers)
    batch = lm_batch(batch=2, seq=12)
    model.eval()
    probe = FirstOrderProbe(blocks, mode)
    base = model(**batch).loss
    base.backward()
    probe.end_step()
    sums, _ = probe.take()
    probe.remove()
    eps = 1e-3
    with torch.no_grad():
        for i in range(len(blocks)):
            with Suppressor(blocks, 1.0 - eps, mode).suppress([i]):
                damped = float(model(**batch).loss)
            finite_diff = damped - float(base)
            predicted = -eps * float(sums[i])
            assert math.isclose(finite_diff, predicted, rel_tol=0.05, abs_tol=2e-6), (i, mode)


def test_probe_reaches_frozen_layers_above_the_lowest_trained_one():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.0, active_layers=1, estimator="first-order",
                       update_interval=100, seed=0)
    opt.set_active_layers([2])
    model(**lm_batch()).loss.backward()
    opt.step()
    sums, counts = opt.rounds.probe.take()
    assert counts.tolist() == [0, 0, 1, 1]
    assert sums[0] == 0 and sums[1] == 0 and sums[3] != 0
    opt.close()


def test_probe_ignores_no_grad_forwards():
    model = lora_model(2)
    probe = FirstOrderProbe(_layers(model), "adapters")
    with torch.no_grad():
        model(**lm_batch())
    probe.end_step()
    sums, counts = probe.take()
    assert counts.sum() == 0 and sums.abs().sum() == 0
    probe.remove()


def test_probe_rejects_dora_and_leaves_no_hook():
    model = lora_model(2, use_dora=True)
    with pytest.raises(ValueError, match="plain peft LoRA"):
        ISTOptimizer(torch.optim.SGD, model, lr=0.1, estimator="first-order")
    hooks = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooks == []


def test_probe_remove_detaches_hooks():
    model = lora_model(2)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, estimator="first-order", seed=0)
    probe = opt.rounds.probe
    opt.close()
    model(**lm_batch()).loss.backward()
    probe.end_step()
    assert probe.take()[1].sum() == 0


def test_first_order_runs_no_extra_forward():
    model = lora_model(4)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.01, estimator="first-order",
                       update_interval=2, seed=0)
    for _ in range(4):
        model(**lm_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(calls) == 4
    assert opt.last_round is not None and opt.scores.abs().sum() > 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_probe_counts_once_under_gradient_checkpointing(use_reentrant):
    def probe_sums(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = lora_model(4)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        probe = FirstOrderProbe(_layers(model), "adapters")
        model(**lm_batch()).loss.backward()
        probe.end_step()
        return probe.take()

    plain_sums, plain_counts = probe_sums(False)
    sums, counts = probe_sums(True)
    assert counts.tolist() == plain_counts.tolist() == [1, 1, 1, 1]
    assert torch.allclose(sums, plain_sums, rtol=1e-5, atol=1e-8)


def test_first_order_round_reduces_before_deciding_to_skip(monkeypatch):
    calls = []

    def recording_average(values, group):
        calls.append(values.clone())
        return values.detach().to(torch.float64).cpu()

    monkeypatch.setattr(first_order_module, "average_across_ranks", recording_average)
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
