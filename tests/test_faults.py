"""Fault injection: an exception inside ``loss_fn`` during an importance round, inside a
forward hook (training forward and round forward), and a KeyboardInterrupt inside
``step()``. Afterwards adapters, train/eval flags, ``requires_grad``, hooks and state are
as before the call, and the next step (or a save and resume) works and trains exactly as
an undisturbed run would.

Faults are injected only through public surfaces: ``loss_fn``, ``register_forward_hook``
on a block, the inner optimizer's ``register_step_pre_hook``, and the public residency
object of ``opt.activator``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import lm_batch, lora_model, params_snapshot

from ist_optim import ISTOptimizer

LAYERS = 4


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is faster, and on a busy machine a second one
    burns CPU spinning (100x the CPU time of these steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Boom(RuntimeError):
    """The injected fault."""


def _blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.base_model.model.model.layers


def _hook_count(model: torch.nn.Module) -> int:
    total = 0
    for module in model.modules():
        total += sum(len(getattr(module, name)) for name in (
            "_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks"))
    for p in model.parameters():
        total += len(getattr(p, "_backward_hooks", None) or {})
        total += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return total


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    return copy.deepcopy(value)


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b.keys())
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _snapshot(model: torch.nn.Module, opt: ISTOptimizer) -> dict[str, Any]:
    """Everything a fault must leave as it was."""
    return {
        "scaling": {n: dict(m.scaling) for n, m in model.named_modules()
                    if isinstance(getattr(m, "scaling", None), dict)},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": _hook_count(model),
        "params": params_snapshot(model),
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "state": _clone(opt.state_dict()),
        "memory": opt.memory_report(),
        "active": opt.active_layers,
        "steps": opt.num_steps,
    }


def _step(model: torch.nn.Module, opt: ISTOptimizer, index: int) -> None:
    opt.zero_grad()
    model(**lm_batch(seed=index)).loss.backward()
    opt.step()


def _build(**kwargs: Any) -> tuple[torch.nn.Module, ISTOptimizer]:
    model = lora_model(LAYERS)
    options = dict(lr=1e-2, seed=0, active_layers=2, update_interval=2)
    options.update(kwargs)
    return model, ISTOptimizer(torch.optim.AdamW, model, **options)


def _resume(model: torch.nn.Module, opt: ISTOptimizer,
            **kwargs: Any) -> tuple[torch.nn.Module, ISTOptimizer]:
    """A fresh model and optimizer loaded from a save of ``model`` and ``opt``."""
    saved_params = {k: v.clone() for k, v in model.state_dict().items()}
    saved_state = _clone(opt.state_dict())
    fresh_model, fresh = _build(**dict(kwargs, seed=123))  # the seed comes from the save
    fresh_model.load_state_dict(saved_params)
    fresh.load_state_dict(saved_state)
    return fresh_model, fresh


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------- loss_fn in a round
@pytest.mark.parametrize("fault, policy", [(Boom, "keep"), (KeyboardInterrupt, "offload")])
def test_loss_fn_raising_during_a_round(fault, policy):
    batch = lm_batch(seed=99)
    calls = {"n": 0, "fail_at": None}

    def loss_fn(model: torch.nn.Module, b: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise fault("injected")
        return model(**b).loss

    model, opt = _build(state_policy=policy, importance_batches=[batch], loss_fn=loss_fn)
    _step(model, opt, 0)
    opt.zero_grad()
    model(**lm_batch(seed=1)).loss.backward()
    before = _snapshot(model, opt)
    calls["fail_at"] = calls["n"] + 2  # the second candidate set, while it is suppressed
    with pytest.raises(fault, match="injected"):
        opt.step()  # step 2 updates, then its round raises
    after = _snapshot(model, opt)
    for key in ("scaling", "training", "requires_grad", "hooks", "active"):
        _assert_same(before[key], after[key], key)
    _assert_same(before["state"]["ist"]["sampler"]["scores"],
                 after["state"]["ist"]["sampler"]["scores"], "scores")  # round not applied
    assert after["steps"] == 2 and opt.last_round is None

    # the next steps work, and a save and resume continues identically
    calls["fail_at"] = None
    resumed_model, resumed = _resume(model, opt, state_policy=policy,
                                     importance_batches=[batch], loss_fn=loss_fn)
    for index in range(2, 6):
        _step(model, opt, index)
        _step(resumed_model, resumed, index)
    assert opt.num_steps == resumed.num_steps == 6 and opt.last_round is not None
    _assert_same_params(model, resumed_model)
    _assert_same(opt.state_dict(), resumed.state_dict())


# ----------------------------------------------------------------- forward hooks
def _raising_hook(when: Callable[[], bool]) -> Callable[..., None]:
    def hook(_module: torch.nn.Module, _args: Any, _output: Any) -> None:
        if when():
            raise Boom("injected in a forward hook")
    return hook


@pytest.mark.filterwarnings("ignore:.*memory_budget.*:UserWarning")
@pytest.mark.parametrize("budget", [None, 1])
def test_forward_hook_raising_in_a_training_forward(budget):
    """A user's forward hook on a block raises once in the training forward (with the
    backward cut; with ``memory_budget=1`` the blocks are also checkpointed). Nothing
    changes, and the run then trains exactly like one where that forward never happened."""
    kwargs = dict(state_policy="offload") if budget is None else dict(
        memory_budget=budget, memory_shape=(2, 8))
    model, opt = _build(**kwargs)
    reference_model, reference = _build(**kwargs)
    armed = {"on": False}
    _blocks(model)[2].register_forward_hook(_raising_hook(lambda: armed["on"]))
    for index in range(3):
        _step(model, opt, index)
        _step(reference_model, reference, index)
    opt.zero_grad()
    before = _snapshot(model, opt)
    armed["on"] = True
    with pytest.raises(Boom):
        model(**lm_batch(seed=50)).loss.backward()
    armed["on"] = False
    after = _snapshot(model, opt)
    for key in ("scaling", "training", "requires_grad", "hooks", "params", "grads", "state",
                "memory", "active", "steps"):
        _assert_same(before[key], after[key], key)
    for index in range(3, 7):
        _step(model, opt, index)
        _step(reference_model, reference, index)
    _assert_same_params(model, reference_model)


def test_forward_hook_raising_in_a_round_forward():
    """The hook raises in a suppressed (no-grad, eval) forward of a round: adapters and
    train flags are restored, and the run goes on."""
    model, opt = _build(importance_batches=[lm_batch(seed=99)])
    armed = {"on": False}
    _blocks(model)[1].register_forward_hook(
        _raising_hook(lambda: armed["on"] and not torch.is_grad_enabled()))
    _step(model, opt, 0)
    opt.zero_grad()
    model(**lm_batch(seed=1)).loss.backward()
    before = _snapshot(model, opt)
    armed["on"] = True
    with pytest.raises(Boom):
        opt.step()
    armed["on"] = False
    after = _snapshot(model, opt)
    for key in ("scaling", "training", "requires_grad", "hooks", "active"):
        _assert_same(before[key], after[key], key)
    for index in range(2, 6):
        _step(model, opt, index)
    assert opt.num_steps == 6 and opt.last_round is not None


# ----------------------------------------------------------------- KeyboardInterrupt in step()
@pytest.mark.parametrize("policy", ["keep", "offload", "drop"])
def test_keyboard_interrupt_before_the_update_changes_nothing_and_retry_is_exact(policy):
    """Ctrl-C inside ``step()`` before the inner update (from the inner optimizer's step
    pre-hook): parameters, gradients (inactive layers' too), optimizer state, active set
    and step count are as before; calling ``step()`` again continues exactly."""
    model, opt = _build(state_policy=policy, update_interval=3)
    reference_model, reference = _build(state_policy=policy, update_interval=3)
    armed = {"on": False}

    def interrupt(*_args: Any) -> None:
        if armed["on"]:
            armed["on"] = False
            raise KeyboardInterrupt

    opt.optimizer.register_step_pre_hook(interrupt)
    for index in range(4):
        _step(model, opt, index)
        _step(reference_model, reference, index)
    opt.zero_grad()
    model(**lm_batch(seed=4)).loss.backward()
    before = _snapshot(model, opt)
    armed["on"] = True
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    after = _snapshot(model, opt)
    for key in ("scaling", "training", "requires_grad", "hooks", "params", "grads", "state",
                "memory", "active", "steps"):
        _assert_same(before[key], after[key], key)
    opt.step()  # the retry
    reference.zero_grad()
    reference_model(**lm_batch(seed=4)).loss.backward()
    reference.step()
    for index in range(5, 8):
        _step(model, opt, index)
        _step(reference_model, reference, index)
    _assert_same_params(model, reference_model)
    _assert_same(opt.state_dict(), reference.state_dict())


def _trained_counts(history: list[list[int]]) -> list[int]:
    return [sum(layer in active for active in history) for layer in range(LAYERS)]


def test_keyboard_interrupt_during_the_active_set_switch_loses_no_state():
    """Ctrl-C inside ``step()`` while the next active set is applied (in the residency's
    offload of a leaving layer). Whatever set then trains, no layer's optimizer state may
    be lost: each parameter's AdamW ``step`` must equal the steps its layer trained."""
    model, opt = _build(state_policy="offload", update_interval=100, active_layers=2)
    residency = opt.activator.residency
    real_deactivate = residency.deactivate
    armed = {"calls": None}

    def deactivate(params: Any) -> None:
        if armed["calls"] is not None:
            armed["calls"] += 1
            if armed["calls"] == 2:  # the second leaving layer: the first is offloaded
                armed["calls"] = None
                raise KeyboardInterrupt
        real_deactivate(params)

    residency.deactivate = deactivate
    trained: list[list[int]] = []
    index = 0
    while True:  # train until a step switches two layers out, and interrupt that switch
        opt.zero_grad()
        model(**lm_batch(seed=index)).loss.backward()
        active = opt.active_layers
        trained.append(active)
        armed["calls"] = 0
        try:
            opt.step()
        except KeyboardInterrupt:
            break
        armed["calls"] = None
        index += 1
        assert index < 50, "no step switched two layers out"
    assert armed["calls"] is None
    for later in range(index + 1, index + 8):
        opt.zero_grad()
        model(**lm_batch(seed=later)).loss.backward()
        trained.append(opt.active_layers)
        opt.step()
    counts = _trained_counts(trained)
    state = opt.state_dict()["state"]
    groups = opt.layer_groups.params
    ids = {id(p): i for i, p in enumerate(
        p for group in opt.param_groups for p in group["params"])}
    for layer, params in enumerate(groups):
        for p in params:
            steps = int(state[ids[id(p)]]["step"]) if ids[id(p)] in state else 0
            assert steps == counts[layer], (layer, steps, counts)
