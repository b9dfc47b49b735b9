"""Parameters a wrapper swaps after ``ISTOptimizer`` was built (accelerate's FSDP2 prepare,
so the HF Trainer's FSDP2 path): the optimizer follows them before its first update.

The two-rank FSDP2 run with accelerate's order is in tests/test_distributed.py
(``test_fsdp2_optimizer_built_before_sharding``); here one process swaps every parameter
for a copy, as ``fully_shard`` does, and the run must equal the one that never swapped.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lm_batch, lora_model, tiny_llama
from torch import nn

from ist_optim import ISTOptimizer
from ist_optim.core.follow import ReplacedParams
from ist_optim.memory.residency import StateResidency


def _swap_params(model: nn.Module, opt: ISTOptimizer) -> dict[str, nn.Parameter]:
    """Every parameter replaced by a new one holding the same values (and
    ``requires_grad``), on the module and in the optimizer's ``param_groups``, position
    for position: what accelerate's FSDP2 prepare does."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    new: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for attr, p in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{attr}" if module_name else attr
            new[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            setattr(module, attr, new[name])
    for group in opt.param_groups:
        group["params"] = [new[name_of[id(p)]] for p in group["params"]]
    return new


def _run(model: nn.Module, opt: ISTOptimizer, steps: int) -> tuple[list, list]:
    return _run_from(model, opt, 0, steps)


def _run_from(model: nn.Module, opt: ISTOptimizer, start: int, stop: int) -> tuple[list, list]:
    """Steps ``start`` to ``stop`` on ``lm_batch(seed=step)``: each step's active set and
    the parameters after it."""
    actives, snapshots = [], []
    for step in range(start, stop):
        actives.append(opt.active_layers)
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return actives, snapshots


@pytest.mark.parametrize("policy", ["keep", "offload", "drop"])
@pytest.mark.parametrize("sampling", ["importance", "uniform"])
def test_swapped_params_train_as_if_never_swapped(policy, sampling):
    kwargs = dict(lr=1e-2, seed=3, active_layers=1, update_interval=2, sampling=sampling,
                  state_policy=policy)
    plain = tiny_llama(4)
    plain_opt = ISTOptimizer(torch.optim.AdamW, plain, **kwargs)
    swapped = tiny_llama(4)
    opt = ISTOptimizer(torch.optim.AdamW, swapped, **kwargs)
    old = dict(swapped.named_parameters())
    old_values = {n: p.detach().clone() for n, p in old.items()}
    _swap_params(swapped, opt)

    expected = _run(plain, plain_opt, 6)
    actives, snapshots = _run(swapped, opt, 6)
    assert actives == expected[0]
    for got, want in zip(snapshots, expected[1], strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
    for name, p in old.items():  # the parameters the model let go of are left alone
        assert torch.equal(p.detach(), old_values[name]), name
    layer_params = {id(p) for ps in opt.layer_groups.params for p in ps}
    assert layer_params == {id(p) for n, p in swapped.named_parameters() if ".layers." in n}


def test_the_active_set_reaches_the_new_parameters():
    model = tiny_llama(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=1)
    _swap_params(model, opt)
    model(**lm_batch()).loss.backward()
    opt.step()
    opt.zero_grad()
    trains = [all(p.requires_grad for p in layer.parameters())
              for layer in model.model.layers]
    assert [i for i, t in enumerate(trains) if t] == opt.active_layers


def test_memory_budget_refuses_a_swap_and_changes_nothing():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=2,
                       sampling="uniform", memory_budget="1GiB", memory_shape=(2, 8))
    layers_before = [list(ps) for ps in opt.layer_groups.params]
    _swap_params(model, opt)
    model(**lm_batch()).loss.backward()
    for _ in range(2):  # refused again: nothing was taken up
        with pytest.raises(ValueError, match="drop memory_budget under FSDP2"):
            opt.step()
        now = opt.layer_groups.params
        assert all(a is b for before, after in zip(layers_before, now, strict=True)
                   for a, b in zip(before, after, strict=True))


def test_replaced_params_refuses_a_swap_after_training():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    seen = ReplacedParams(sgd)
    (a.sum() + b.sum()).backward()
    sgd.step()
    sgd.param_groups[0]["params"][0] = nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError, match="only before the first step"):
        seen.check()
    with pytest.raises(RuntimeError, match="only before the first step"):
        seen.check()  # still unseen


def test_replaced_params_refuses_parameters_added_behind_its_back():
    sgd = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    seen = ReplacedParams(sgd)
    sgd.add_param_group({"params": [nn.Parameter(torch.ones(1))]})
    with pytest.raises(RuntimeError, match="ISTOptimizer.add_param_group"):
        seen.check()
    seen.mark_seen()
    assert seen.check() == {}


def test_add_param_group_is_not_taken_for_a_swap():
    model = tiny_llama(2)
    extra = nn.Parameter(torch.zeros(3))
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=1)
    opt.add_param_group({"params": [extra]})
    model(**lm_batch()).loss.backward()
    opt.step()
    assert any(p is extra for p in opt.layer_groups.outside)


def test_the_residency_changes_only_while_it_holds_nothing():
    p = nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    adam.step()
    model = tiny_llama(2)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, state_policy="offload")
    holding = StateResidency(adam, "offload")
    holding.deactivate([p])
    opt.activator.use_residency(holding)  # the one in use held nothing
    assert opt.state_policy == "offload"
    with pytest.raises(RuntimeError, match="cannot change while it holds state"):
        opt.activator.use_residency(StateResidency(adam, "keep"))
    assert opt.activator.residency is holding


@pytest.mark.parametrize("policy", ["keep", "offload"])
def test_a_checkpoint_loads_into_swapped_params_as_the_trainer_resumes(policy):
    """The HF Trainer resumes after accelerate's prepare, so before IST's first step."""
    kwargs = dict(lr=1e-2, seed=5, active_layers=1, sampling="uniform", state_policy=policy)
    model = tiny_llama(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, **kwargs)
    _run(model, opt, 3)
    saved = copy.deepcopy(opt.state_dict())  # both share storage with the live run
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    expected = _run_from(model, opt, 3, 6)

    resumed = tiny_llama(4, seed=9)
    resumed.load_state_dict(weights)
    opt = ISTOptimizer(torch.optim.AdamW, resumed, **kwargs)
    _swap_params(resumed, opt)
    opt.load_state_dict(saved)
    got = _run_from(resumed, opt, 3, 6)
    assert got[0] == expected[0]
    for name, value in expected[1][-1].items():
        assert torch.equal(got[1][-1][name], value), name
