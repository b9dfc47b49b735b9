"""ISTOptimizer.set_importance_batches: a batch source given after construction."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, lora_model

from ist_optim import ISTOptimizer


def test_rounds_cycle_the_batches_from_batches_seen_and_the_capture_hook_goes():
    model = lora_model(4)
    used = []

    def loss_fn(m, batch):
        used.append(batch["tag"])
        return m(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0, update_interval=1,
                       num_candidates=2, loss_fn=loss_fn)
    hooks = len(model._forward_pre_hooks)
    batches = [{**lm_batch(seed=i), "tag": i} for i in range(3)]
    opt.set_importance_batches(batches, batches_seen=1)
    assert len(model._forward_pre_hooks) == hooks - 1  # the batch-capturing hook is removed
    for step in range(3):
        model(**lm_batch(seed=10 + step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert used == [1, 1, 2, 2, 0, 0]  # K=2 candidate sets per round, one batch per round
    assert opt.state_dict()["ist"]["rounds"]["importance_batches_seen"] == 4


def test_refusals():
    model = lora_model(4)
    uniform = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, sampling="uniform")
    with pytest.raises(ValueError, match="uniform"):
        uniform.set_importance_batches([lm_batch()])
    given = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, importance_batches=[lm_batch()])
    with pytest.raises(ValueError, match="already set"):
        given.set_importance_batches([lm_batch()])
    fresh = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3)
    with pytest.raises(ValueError, match="batches_seen"):
        fresh.set_importance_batches([lm_batch()], batches_seen=-1)
    with pytest.raises(TypeError, match="one-shot iterator"):
        fresh.set_importance_batches(iter([lm_batch()]))
