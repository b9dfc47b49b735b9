"""ISTConfig: every option validated once, with a one-line error naming value and fix."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import lora_model

from ist_optim import ISTConfig, ISTOptimizer

BAD = [
    (dict(active_layers=0), ValueError, "active_layers"),
    (dict(active_layers=1.5), ValueError, "active_layers=1.5"),
    (dict(active_layers=True), TypeError, "active_layers"),
    (dict(num_candidates=1), ValueError, "num_candidates: 1"),
    (dict(score_lr=-1.0), ValueError, "score_lr: -1.0"),
    (dict(score_lr=math.inf), ValueError, "score_lr: inf"),
    (dict(suppression=1.0), ValueError, "suppression: 1.0"),
    (dict(update_interval=0), ValueError, "update_interval: 0"),
    (dict(sampling="random"), ValueError, "sampling: 'random'"),
    (dict(estimator="exact"), ValueError, "estimator: 'exact'"),
    (dict(sampling="uniform", estimator="normalized"), ValueError, "no effect"),
    (dict(suppression_mode="lora"), ValueError, "suppression_mode: 'lora'"),
    (dict(freeze_inactive=1), TypeError, "freeze_inactive"),
    (dict(state_policy="gpu"), ValueError, "state_policy: 'gpu'"),
    (dict(skip_backward="yes"), TypeError, "skip_backward"),
    (dict(skip_backward=True, freeze_inactive=False), ValueError, "needs freeze_inactive"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(advantage_scale=-0.1), ValueError, "advantage_scale"),
    (dict(score_retention=1.5), ValueError, "score_retention: 1.5"),
    (dict(scale_decay=1.0), ValueError, "scale_decay: 1.0"),
    (dict(depth_window=0), ValueError, "depth_window: 0"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_option_raises_one_line_error(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        ISTConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_optimizer_refuses_it_before_touching_the_model(kwargs, error, match):
    model = lora_model(4)
    hooks = len(model._forward_pre_hooks)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=match):
        ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, **kwargs)
    assert len(model._forward_pre_hooks) == hooks
    assert [p.requires_grad for p in model.parameters()] == flags


def test_estimator_constants_reach_the_update():
    from conftest import lm_batch

    def scores(**kwargs):
        model = lora_model(4)
        opt = ISTOptimizer(torch.optim.SGD, model, lr=1e-3, seed=0, update_interval=1,
                           estimator="normalized", **kwargs)
        model(**lm_batch()).loss.backward()
        opt.step()
        return opt.scores

    base = scores()
    assert torch.allclose(scores(advantage_scale=0.2), 2 * base)
    assert opt_config_defaults_match()


def opt_config_defaults_match() -> bool:
    opt = ISTOptimizer(torch.optim.SGD, lora_model(4), lr=1e-3)
    return opt.config == ISTConfig()


@pytest.mark.parametrize("name", ["score_lr", "suppression", "score_retention"])
def test_nan_option_is_a_value_error_naming_the_range(name):
    with pytest.raises(ValueError, match=rf"Invalid {name}: nan; expected a number in"):
        ISTOptimizer(torch.optim.SGD, lora_model(4), lr=1e-3, **{name: float("nan")})
