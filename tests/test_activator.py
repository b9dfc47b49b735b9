"""LayerActivator on its own: requires_grad, state residency, held gradients, the cut, close."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch
from torch import nn

from ist_optim.config import StatePolicy
from ist_optim.core.activator import LayerActivator
from ist_optim.core.groups import LayerGroups, build_layer_groups
from ist_optim.memory.residency import StateResidency

NUM_LAYERS = 4


def _model(seed: int = 0) -> nn.Sequential:
    """Four ``Linear(4, 4)`` blocks (the layers) and a head (the outside group)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(*(nn.Linear(4, 4) for _ in range(NUM_LAYERS)), nn.Linear(4, 2))


def _groups(model: nn.Sequential) -> LayerGroups:
    return build_layer_groups(model, list(model.parameters()), list(model)[:NUM_LAYERS])


def _setup(policy: StatePolicy = "keep", *, optimizer_cls: type = torch.optim.AdamW,
           freeze_inactive: bool = True, cut_backward: bool = False,
           defer_first_freeze: bool = False,
           ) -> tuple[nn.Sequential, LayerGroups, torch.optim.Optimizer, LayerActivator]:
    model = _model()
    groups = _groups(model)
    opt = optimizer_cls(model.parameters(), lr=0.1)
    act = LayerActivator(groups, StateResidency(opt, policy), freeze_inactive=freeze_inactive,
                         cut_backward=cut_backward, defer_first_freeze=defer_first_freeze)
    return model, groups, opt, act


def _backward(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    model(torch.randn(3, 4, generator=g)).pow(2).sum().backward()


def _step_all(model: nn.Module, opt: torch.optim.Optimizer, act: LayerActivator,
              seed: int = 0) -> None:
    """One update with every layer active, so every parameter gets optimizer state."""
    act.apply(range(NUM_LAYERS))
    _backward(model, seed)
    opt.step()
    opt.zero_grad()


def _snapshot(opt: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> dict[Any, dict]:
    return {p: {k: v.clone() if isinstance(v, torch.Tensor) else v
                for k, v in opt.state[p].items()} for p in params}


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _requires_grad(groups: LayerGroups) -> list[list[bool]]:
    return [[p.requires_grad for p in ps] for ps in groups.params]


# ------------------------------------------------------------------ groups of the fixture
def test_fixture_groups_have_four_layers_and_the_head_outside() -> None:
    model = _model()
    groups = _groups(model)
    assert groups.num_layers == NUM_LAYERS
    assert [len(ps) for ps in groups.params] == [2] * NUM_LAYERS
    assert {id(p) for p in groups.outside} == {id(p) for p in model[NUM_LAYERS].parameters()}


# ------------------------------------------------------------------ apply / requires_grad
@pytest.mark.parametrize("active", [[0], [1, 3], [0, 1, 2, 3], [2]])
def test_apply_freezes_exactly_the_inactive_layers(active: list[int]) -> None:
    model, groups, _, act = _setup()
    act.apply(active)
    assert act.active == sorted(active)
    assert _requires_grad(groups) == [[i in active] * 2 for i in range(NUM_LAYERS)]
    # the outside group is never frozen
    assert all(p.requires_grad for p in model[NUM_LAYERS].parameters())


def test_switching_sets_moves_requires_grad_and_the_active_set() -> None:
    _, groups, _, act = _setup()
    act.apply([3, 0])
    assert act.active == [0, 3]
    act.apply([1])
    assert act.active == [1]
    assert _requires_grad(groups) == [[False] * 2, [True] * 2, [False] * 2, [False] * 2]
    act.apply([2, 1])
    assert act.active == [1, 2]
    assert _requires_grad(groups) == [[False] * 2, [True] * 2, [True] * 2, [False] * 2]


def test_frozen_layers_get_no_weight_gradient_in_backward() -> None:
    model, groups, _, act = _setup()
    act.apply([2])
    _backward(model)
    assert [all(p.grad is not None for p in ps) for ps in groups.params] == [
        False, False, True, False]
    assert all(p.grad is None for i in (0, 1, 3) for p in groups.params[i])
    assert all(p.grad is not None for p in groups.outside)


def test_without_freeze_inactive_requires_grad_is_left_alone() -> None:
    _, groups, _, act = _setup(freeze_inactive=False)
    act.apply([1])
    assert act.active == [1]
    assert all(all(row) for row in _requires_grad(groups))
    assert not act.freezes_now


def test_apply_covers_parameters_registered_after_construction() -> None:
    model, groups, _, act = _setup()
    act.apply([1])
    extra = nn.Parameter(torch.zeros(4))
    model[0].register_parameter("extra", extra)
    assert groups.add_params([extra]) == [0]
    act.apply([1])
    assert extra.requires_grad is False
    act.apply([0])
    assert extra.requires_grad is True


def test_deferred_first_freeze_keeps_requires_grad_until_end_deferral() -> None:
    _, groups, _, act = _setup(defer_first_freeze=True)
    assert not act.freezes_now
    act.apply([1])
    assert act.active == [1]
    assert all(all(row) for row in _requires_grad(groups))
    act.end_deferral()
    assert act.freezes_now
    act.apply([1])
    assert _requires_grad(groups) == [[i == 1] * 2 for i in range(NUM_LAYERS)]


# ------------------------------------------------------------------ state residency
def test_keep_leaves_the_state_of_leaving_layers_in_the_optimizer() -> None:
    model, groups, opt, act = _setup("keep")
    _step_all(model, opt, act)
    before = _snapshot(opt, groups.layer_params(range(NUM_LAYERS)))
    act.apply([1])
    assert act.residency.offloaded_bytes() == 0
    for p, entry in before.items():
        assert p in opt.state and _same_state(opt.state[p], entry)


def test_offload_takes_state_out_and_brings_it_back_bit_identical() -> None:
    model, groups, opt, act = _setup("offload")
    _step_all(model, opt, act)
    _step_all(model, opt, act, seed=1)  # a state that is not the first step's
    before = _snapshot(opt, groups.layer_params(range(NUM_LAYERS)))
    act.apply([1])
    inactive = groups.layer_params([0, 2, 3])
    assert all(p not in opt.state for p in inactive)
    assert all(p in opt.state for p in groups.params[1])
    assert all(p in opt.state for p in groups.outside)  # the outside group never moves
    expected = sum(v.numel() * v.element_size() for p in inactive
                   for v in before[p].values() if isinstance(v, torch.Tensor))
    assert act.residency.offloaded_bytes() == expected > 0
    act.apply([0, 3])  # 0 and 3 return, 1 leaves
    for p in groups.layer_params([0, 3]):
        assert p in opt.state and _same_state(opt.state[p], before[p])
    assert all(p not in opt.state for p in groups.layer_params([1, 2]))
    act.apply(range(NUM_LAYERS))
    for p, entry in before.items():
        assert _same_state(opt.state[p], entry)
    assert act.residency.offloaded_bytes() == 0


def test_drop_deletes_the_state_and_a_returning_layer_starts_fresh() -> None:
    model, groups, opt, act = _setup("drop")
    _step_all(model, opt, act)
    act.apply([1])
    assert all(p not in opt.state for p in groups.layer_params([0, 2, 3]))
    assert all(p in opt.state for p in groups.params[1] + groups.outside)
    assert act.residency.offloaded_bytes() == 0
    act.apply([0, 1])
    assert all(p not in opt.state for p in groups.params[0])  # nothing comes back
    _backward(model)
    opt.step()
    # layer 0's AdamW step count restarted; layer 1 kept counting
    assert [float(opt.state[p]["step"]) for p in groups.params[0]] == [1.0, 1.0]
    assert [float(opt.state[p]["step"]) for p in groups.params[1]] == [2.0, 2.0]


class _FailingResidency(StateResidency):
    """Raises when the state of ``fail_on``'s parameters is about to be activated."""

    def __init__(self, optimizer: torch.optim.Optimizer, policy: StatePolicy,
                 fail_on: list[torch.Tensor]):
        super().__init__(optimizer, policy)
        self.fail_on = {id(p) for p in fail_on}
        self.armed = False

    def activate(self, params: Iterable[torch.Tensor]) -> None:
        params = list(params)
        if self.armed and any(id(p) in self.fail_on for p in params):
            raise RuntimeError("interrupted")
        super().activate(params)


def _failing_on_layer_2() -> tuple[LayerGroups, torch.optim.Optimizer, _FailingResidency,
                                   LayerActivator]:
    """An "offload" activator after one all-layer step, whose residency raises (once armed)
    when layer 2's state is about to come back."""
    model = _model()
    groups = _groups(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    residency = _FailingResidency(opt, "offload", groups.params[2])
    act = LayerActivator(groups, residency, freeze_inactive=True, cut_backward=False)
    _step_all(model, opt, act)
    return groups, opt, residency, act


def test_an_interrupted_switch_keeps_the_set_before_and_names_the_state_held() -> None:
    groups, opt, residency, act = _failing_on_layer_2()
    before = _snapshot(opt, groups.layer_params(range(NUM_LAYERS)))
    act.apply([0])
    residency.armed = True
    with pytest.raises(RuntimeError, match="interrupted"):
        act.apply([1, 2])
    assert act.active == [0]  # the set that trained before: the switch did not commit
    assert act.switched_in == [1]
    held = [i for i in range(NUM_LAYERS) if all(p in opt.state for p in groups.params[i])]
    assert held == act.switched_in
    residency.armed = False
    act.apply([1, 2])  # the next apply finishes the switch
    assert act.active == act.switched_in == [1, 2]
    for p in groups.layer_params([1, 2]):
        assert _same_state(opt.state[p], before[p])


def test_finish_switch_puts_the_recorded_set_back_after_an_interruption() -> None:
    groups, opt, residency, act = _failing_on_layer_2()
    act.apply([0, 1])
    residency.armed = True
    with pytest.raises(RuntimeError, match="interrupted"):
        act.apply([2, 3])
    assert act.switched_in != act.active == [0, 1]
    residency.armed = False
    act.finish_switch()
    assert act.active == act.switched_in == [0, 1]
    assert _requires_grad(groups) == [[i in (0, 1)] * 2 for i in range(NUM_LAYERS)]
    assert all(p in opt.state for p in groups.layer_params([0, 1]))
    assert not any(p in opt.state for p in groups.layer_params([2, 3]))


def test_finish_switch_does_nothing_after_a_complete_apply() -> None:
    _, _, _, act = _setup("offload")
    act.apply([1])
    calls = []
    act.residency.activate = lambda params: calls.append(params)  # type: ignore[method-assign]
    act.finish_switch()
    assert calls == [] and act.active == [1]


def test_apply_refuses_bad_indices_and_changes_nothing() -> None:
    _, groups, _, act = _setup()
    act.apply([1])
    for bad in ([], [1, 1], [4], ["a"], [True]):
        with pytest.raises(ValueError, match="distinct indices"):
            act.apply(bad)
    act.finish_switch()
    assert act.active == [1]
    assert _requires_grad(groups) == [[i == 1] * 2 for i in range(NUM_LAYERS)]


def test_reset_forgets_offloaded_state_and_treats_every_layer_as_switched_in() -> None:
    model, groups, opt, act = _setup("offload")
    _step_all(model, opt, act)
    stale = _snapshot(opt, groups.params[0])
    act.apply([1])
    assert act.residency.offloaded_bytes() > 0
    # a checkpoint load puts every saved entry into the optimizer; this checkpoint has
    # none for layer 2 (never trained when it was saved)
    loaded = {p: {"step": torch.tensor(7.0), "exp_avg": torch.full_like(p, 0.5),
                  "exp_avg_sq": torch.full_like(p, 0.25)}
              for p in groups.layer_params([0, 1, 3])}
    for p, entry in loaded.items():
        opt.state[p] = {k: v.clone() for k, v in entry.items()}
    act.reset()
    assert act.switched_in == list(range(NUM_LAYERS)) and act.active == [1]
    assert act.residency.offloaded_bytes() == 0  # layer 2's stale state is forgotten
    act.finish_switch()  # every layer but 1 "leaves": the loaded state is offloaded
    assert act.switched_in == [1]
    assert all(p not in opt.state for p in groups.layer_params([0, 2, 3]))
    act.apply([0, 2])
    for p in groups.params[0]:  # the loaded state comes back, not the stale one
        assert _same_state(opt.state[p], loaded[p])
        assert not _same_state(opt.state[p], stale[p])
    assert all(p not in opt.state for p in groups.params[2])


# ------------------------------------------------------------------ the active set in checkpoints
def test_state_dict_round_trip_records_the_set_and_finish_switch_applies_it() -> None:
    _, groups, _, act = _setup()
    act.apply([0, 3])
    assert act.state_dict() == {"active_layers": [0, 3]}
    _, other_groups, _, other = _setup()
    other.apply([1])
    other.load_state_dict({"active_layers": [3, 0], "scores": "ignored: not its key"})
    assert other.active == [0, 3]
    other.finish_switch()
    assert _requires_grad(other_groups) == [[i in (0, 3)] * 2 for i in range(NUM_LAYERS)]


@pytest.mark.parametrize("junk", [None, "01", [], [0, 0], [0, 9], [-1], [0.5], {"0": 1}, 3])
def test_check_state_refuses_a_malformed_active_set_and_changes_nothing(junk: Any) -> None:
    _, _, _, act = _setup()
    act.apply([2])
    with pytest.raises(ValueError, match=r"^IST checkpoint entry 'active_layers' is .*"
                                         r"expected distinct layer indices in \[0, 4\)$"):
        act.load_state_dict({"active_layers": junk})
    with pytest.raises(ValueError, match="no 'active_layers' entry"):
        act.check_state({})
    assert act.active == [2]


# ------------------------------------------------------------------ gradients
def test_trained_grads_lists_only_active_and_outside_gradients() -> None:
    model, groups, _, act = _setup(freeze_inactive=False)
    act.apply([1, 3])
    _backward(model)  # every parameter has a gradient (nothing frozen)
    assert all(p.grad is not None for p in model.parameters())
    expected = [p.grad for p in groups.layer_params([1, 3]) + groups.outside]
    got = act.trained_grads()
    assert len(got) == len(expected) == 6
    assert all(a is b for a, b in zip(got, expected, strict=True))


def test_trained_grads_leaves_out_parameters_without_a_gradient() -> None:
    model, groups, _, act = _setup()
    act.apply([2])
    assert act.trained_grads() == []
    _backward(model)
    groups.params[2][1].grad = None  # the bias of the active layer has none
    got = act.trained_grads()
    assert [id(g) for g in got] == [id(p.grad) for p in [groups.params[2][0], *groups.outside]]


def test_grad_norms_are_the_l2_norms_of_each_active_layer() -> None:
    _, groups, _, act = _setup(freeze_inactive=False)
    act.apply([0, 2, 3])
    g = torch.Generator().manual_seed(3)
    for p in groups.layer_params(range(NUM_LAYERS)) + groups.outside:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
    groups.params[3][0].grad = None  # a layer with only part of its grads
    groups.params[3][1].grad = None  # ... and then none: left out
    norms = act.grad_norms()
    assert set(norms) == {0, 2}
    for i in (0, 2):
        w, b = (p.grad.double() for p in groups.params[i])
        expected = (w.pow(2).sum() + b.pow(2).sum()).sqrt().item()
        assert norms[i] == pytest.approx(expected, rel=1e-6)
    groups.params[3][1].grad = torch.tensor([3.0, 0.0, 0.0, 4.0])
    assert act.grad_norms()[3] == pytest.approx(5.0)


def test_grad_norms_is_empty_without_gradients() -> None:
    _, _, _, act = _setup()
    act.apply([1])
    assert act.grad_norms() == {}


@pytest.mark.parametrize("policy", ["keep", "offload", "drop"])
def test_update_only_active_keeps_inactive_parameters_unchanged(policy: StatePolicy) -> None:
    model, groups, opt, act = _setup(policy, optimizer_cls=torch.optim.SGD,
                                     freeze_inactive=False)
    act.apply([1])
    _backward(model)
    before = {p: p.detach().clone() for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}
    assert all(g is not None for g in grads.values())
    with act.update_only_active():
        assert all(p.grad is None for p in groups.layer_params([0, 2, 3]))
        assert all(p.grad is grads[p] for p in groups.params[1] + groups.outside)
        opt.step()
    for i, params in enumerate(groups.params):
        for p in params:
            assert torch.equal(p, before[p]) == (i != 1)
    assert all(not torch.equal(p, before[p]) for p in groups.outside)
    # on exit every gradient is back, the same tensor
    assert all(p.grad is grads[p] for p in model.parameters())


def test_update_only_active_puts_gradients_back_when_the_step_raises() -> None:
    model, groups, _, act = _setup(freeze_inactive=False)
    act.apply([0])
    _backward(model)
    grads = {p: p.grad for p in model.parameters()}
    with pytest.raises(RuntimeError, match="boom"), act.update_only_active():
        assert groups.params[2][0].grad is None
        raise RuntimeError("boom")
    assert all(p.grad is grads[p] for p in model.parameters())


def test_hold_inactive_grads_after_a_closure_backward_inside_the_context() -> None:
    """A closure's backward inside the context gives inactive layers gradients again;
    hold_inactive_grads takes them out before the update."""
    model, groups, opt, act = _setup(optimizer_cls=torch.optim.SGD, freeze_inactive=False)
    act.apply([2])
    before = {p: p.detach().clone() for p in model.parameters()}
    with act.update_only_active():
        _backward(model, seed=5)
        assert all(p.grad is not None for p in groups.params[0])
        act.hold_inactive_grads()
        assert all(p.grad is None for p in groups.layer_params([0, 1, 3]))
        opt.step()
    for i, params in enumerate(groups.params):
        for p in params:
            assert torch.equal(p, before[p]) == (i != 2)
    # the closure's gradients of inactive layers come back on exit
    assert all(p.grad is not None for p in groups.layer_params([0, 1, 3]))


# ------------------------------------------------------------------ backward cut / close
def test_backward_cut_follows_the_lowest_applied_layer() -> None:
    model, groups, _, act = _setup(cut_backward=True)
    assert act.backward_cut is not None
    x = torch.randn(2, 4, requires_grad=True)  # input grads forced

    act.apply([2])
    model(x).sum().backward()
    assert x.grad is None  # backward stopped at layer 2's input
    assert all(p.grad is not None for p in groups.params[2])
    model.zero_grad(set_to_none=True)

    act.apply([0, 3])
    model(x).sum().backward()
    assert x.grad is not None  # the lowest active layer is the first: nothing cut


def test_close_restores_requires_grad_and_removes_the_hooks() -> None:
    model, groups, _, act = _setup(cut_backward=True)
    assert all(len(m._forward_pre_hooks) == 1 for m in groups.modules)
    act.apply([2])
    assert not all(all(row) for row in _requires_grad(groups))
    act.close()
    assert all(all(row) for row in _requires_grad(groups))
    assert all(len(m._forward_pre_hooks) == 0 for m in groups.modules)
    assert act.backward_cut is None
    x = torch.randn(2, 4, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None  # no cut any more
    act.close()  # a second close is harmless


def test_close_without_freeze_inactive_leaves_requires_grad_as_it_was() -> None:
    _, groups, _, act = _setup(freeze_inactive=False)
    groups.params[0][0].requires_grad_(False)  # the user's own choice
    act.apply([1])
    act.close()
    assert groups.params[0][0].requires_grad is False
