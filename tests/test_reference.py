"""ISTOptimizer agrees with the slow reference implementation step by step."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, lora_model
from reference_ist import ReferenceIST

from ist_optim import ISTOptimizer
from ist_optim.importance.suppression import find_tuner_layers


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_for_30_steps(seed):
    fast_model, ref_model = lora_model(8), lora_model(8)
    opts = dict(active_layers=3, suppressed_layers=4, num_candidates=3, score_lr=50.0,
                suppression=0.25, update_interval=3)
    fast = ISTOptimizer(torch.optim.AdamW, fast_model, lr=1e-2, seed=seed, **opts)
    blocks = list(ref_model.base_model.model.model.layers)
    ref = ReferenceIST(
        ref_model,
        [[p for n, p in b.named_parameters() if "lora_" in n] for b in blocks],
        [find_tuner_layers(b) for b in blocks],
        lr=1e-2, seed=seed, active=3, suppressed=4, candidates=3, eta=50.0, lam=0.25,
        interval=3,
    )
    for step in range(30):
        assert fast.active_layers == ref.active, step
        batch = lm_batch(seed=step)
        fast_model(**batch).loss.backward()
        fast.step()
        fast.zero_grad()
        ref_model(**batch).loss.backward()
        ref.step(batch)
        torch.testing.assert_close(fast.scores, torch.tensor(ref.s, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-9)
        for (name, a), (_, b) in zip(fast_model.named_parameters(),
                                     ref_model.named_parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{step} {name}")
    assert not torch.equal(fast.scores, torch.zeros(8, dtype=torch.float64))
