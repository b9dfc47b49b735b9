"""bitsandbytes 8-bit optimizers wrapped by ISTOptimizer (CPU; paged ones fall back)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import lm_batch, lora_model

from ist_optim import ISTOptimizer

bnb = pytest.importorskip("bitsandbytes")

# min_8bit_size=0: the tiny test tensors (< 4096 elements) would otherwise keep fp32 state.
BNB_KWARGS = dict(lr=1e-2, min_8bit_size=0)
OPTIMIZERS = ["AdamW8bit", "PagedAdamW8bit"]


def train(opt, model, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(autouse=True)
def _quiet_paged_fallback():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Paged optimizers are not supported on CPU")
        yield


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_all_layers_active_equals_the_plain_8bit_optimizer(name):
    cls = getattr(bnb.optim, name)
    model_a, model_b = lora_model(4), lora_model(4)
    ist = ISTOptimizer(cls, model_a, active_layers=1.0, sampling="uniform", seed=0, **BNB_KWARGS)
    plain = cls([p for p in model_b.parameters() if p.requires_grad], **BNB_KWARGS)
    for step in range(3):
        train(ist, model_a, 1, start=step)
        train(plain, model_b, 1, start=step)
        for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_8bit_state_only_for_trained_layers_and_exact_resume(name):
    cls = getattr(bnb.optim, name)
    model = lora_model(4)
    opt = ISTOptimizer(cls, model, active_layers=1, update_interval=2, seed=0, **BNB_KWARGS)
    trained = set()
    for step in range(4):
        trained.update(opt.active_layers)
        train(opt, model, 1, start=step)
    with_state = {i for i, ps in enumerate(opt.groups.params) if any(p in opt.state for p in ps)}
    assert with_state == trained and len(trained) < 4
    state = next(iter(opt.state.values()))
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert opt.memory_report()["state_bytes_on_device"] > 0
    saved = opt.state_dict()

    # continue 3 steps, against a fresh model + optimizer loaded from the state dict
    resumed_model = lora_model(4)
    resumed_model.load_state_dict(model.state_dict())
    resumed = ISTOptimizer(cls, resumed_model, active_layers=1, update_interval=2, seed=1,
                           **BNB_KWARGS)
    resumed.load_state_dict(saved)
    assert resumed.active_layers == opt.active_layers
    train(opt, model, 3, start=4)
    train(resumed, resumed_model, 3, start=4)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(opt.scores, resumed.scores)


def test_paged_optimizer_warns_and_falls_back_on_cpu():
    model = lora_model(4)
    opt = ISTOptimizer(bnb.optim.PagedAdamW8bit, model, seed=0, **BNB_KWARGS)
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        warnings.filterwarnings("default", "Paged optimizers")
        train(opt, model, 1)
    assert all(not getattr(s["state1"], "is_paged", False) for s in opt.state.values())
