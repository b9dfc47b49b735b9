"""The torch optimizer contract of ISTOptimizer (``WrappedOptimizer``): pickling, hooks,
closures (LBFGS), as ``torch.optim.Optimizer`` users and tools expect."""

from __future__ import annotations

import copy
import pickle

import torch
from conftest import lora_model, params_snapshot, train_steps
from torch import nn

from ist_optim import ISTOptimizer
from ist_optim.core.wrapper import WrappedOptimizer

_train = train_steps


def test_the_inner_optimizer_owns_param_groups_state_and_defaults():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    assert isinstance(opt, WrappedOptimizer) and isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state and opt.defaults is opt.optimizer.defaults
    opt.param_groups[0]["lr"] = 0.5  # a scheduler writes through the wrapper
    assert opt.optimizer.param_groups[0]["lr"] == 0.5


def test_pickle_and_deepcopy_round_trip():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, update_interval=2)
    _train(model, opt, 3)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.active_layers == opt.active_layers
        assert torch.equal(clone.scores, opt.scores)
        assert clone.num_steps == 3
        _train(clone.model, clone, 2, start=3)  # the copy trains its own model
    _train(model, opt, 2, start=3)
    twin = copy.deepcopy(opt)
    assert twin.state_dict()["ist"]["sampler"]["num_steps"] == 5


def test_state_dict_hooks_registered_on_the_wrapper_run():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("save-post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["save-pre", "save-post", "load-pre", "load-post"]


def test_global_step_hooks_fire_once_per_step():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    seen = []
    handle = register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(o))
    mine = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("own"))
    try:
        _train(model, opt, 2)
    finally:
        handle.remove()
        mine.remove()
    assert seen == [opt, "own", opt, "own"]


def test_lbfgs_gets_the_closure_and_trains():
    with torch.random.fork_rng():  # the init must not depend on the tests run before
        torch.manual_seed(0)
        blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
    model = nn.Sequential(*blocks)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    opt = ISTOptimizer(torch.optim.LBFGS, model, layers=list(blocks), active_layers=2,
                       sampling="uniform", seed=0, lr=0.5, max_iter=5)
    losses = []

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = params_snapshot(model)
    active = opt.active_layers
    losses.append(float(opt.step(closure)))
    changed = [i for i in range(4) if not torch.equal(before[f"{i}.weight"], blocks[i].weight)]
    assert changed == active  # no curvature history yet: only the active layers move
    for _ in range(3):
        losses.append(float(opt.step(closure)))
    assert float(closure()) < losses[0]


def test_closure_with_freeze_inactive_false_keeps_inactive_layers_fixed():
    blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
    model = nn.Sequential(*blocks)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    opt = ISTOptimizer(torch.optim.SGD, model, layers=list(blocks), active_layers=1,
                       sampling="uniform", seed=0, lr=0.1, freeze_inactive=False)
    before = params_snapshot(model)
    active = opt.active_layers

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    changed = [i for i in range(4) if not torch.equal(before[f"{i}.weight"], blocks[i].weight)]
    assert changed == active
    assert all(b.weight.grad is not None for b in blocks)  # inactive grads kept, not updated
