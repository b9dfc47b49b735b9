"""benchmarks/inactive_updates.py: the layers that just left IST's active set move on their
kept AdamW state by exactly ``lr * scale * beta1**j * m_hat / (sqrt(v_hat) + eps)`` for
``max_steps`` steps, then stop; the optimizer state is left as it was; ``scale=0`` changes
nothing."""

from __future__ import annotations

import doctest

import pytest
import torch
from conftest import load_benchmark

from ist_optim import ISTOptimizer

inactive_updates = load_benchmark("inactive_updates")
InactiveMomentum = inactive_updates.InactiveMomentum

LR = 0.1


def _setup(**ist):
    torch.manual_seed(0)
    blocks = [torch.nn.Linear(4, 4) for _ in range(4)]
    model = torch.nn.Sequential(*blocks)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=LR, seed=0, layers=blocks,
                       sampling="uniform", active_layers=1, **ist)
    return model, opt


def _step(model, opt, x, layers=None):
    """One training step (on ``layers`` when given); returns the set that trained."""
    if layers is not None:
        opt.set_active_layers(layers)
    trained = opt.active_layers
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return trained


def _state_copy(opt):
    return {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for p, s in opt.optimizer.state.items()}


def _expected(opt, p, j, scale):
    """The move of ``p`` by hand, in float64, from its (unchanged) AdamW state."""
    s = opt.optimizer.state[p]
    group = opt.optimizer.param_groups[0]
    (b1, b2), eps, t = group["betas"], group["eps"], float(s["step"])
    m_hat = s["exp_avg"].double() / (1 - b1 ** t)
    v_hat = s["exp_avg_sq"].double() / (1 - b2 ** t)
    return -LR * scale * b1 ** j * m_hat / (v_hat.sqrt() + eps)


def test_doctests():
    assert doctest.testmod(inactive_updates).failed == 0


def test_a_layer_that_left_moves_by_the_formula_for_max_steps_then_stops_and_state_is_kept():
    model, opt = _setup()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    scale, max_steps = 0.5, 2
    helper = InactiveMomentum(opt, scale=scale, max_steps=max_steps)
    params = opt.layer_groups.params
    # the layer trained in each step, and the (layer, j) that must move after it
    schedule = [(0, []), (1, [(0, 1)]), (2, [(0, 2), (1, 1)]), (3, [(1, 2), (2, 1)]),
                (3, [(2, 2)]), (0, [(3, 1)])]
    for layer, moves in schedule:
        trained = _step(model, opt, x, [layer])
        assert trained == [layer]
        before = [[p.detach().clone() for p in ps] for ps in params]
        state = _state_copy(opt)
        helper.after_step(LR, trained)
        # (c) the optimizer state is unchanged
        assert set(opt.optimizer.state) == set(state)
        for p, entry in state.items():
            for k, v in entry.items():
                assert torch.equal(opt.optimizer.state[p][k], v) if torch.is_tensor(v) \
                    else opt.optimizer.state[p][k] == v
        moved = dict(moves)
        for i, ps in enumerate(params):
            for p, old in zip(ps, before[i], strict=True):
                if i in moved:  # (a) exactly the formula, and a real move
                    delta = _expected(opt, p, moved[i], scale)
                    assert delta.abs().max() > 1e-3
                    torch.testing.assert_close(p.detach().double(), old.double() + delta,
                                               rtol=1e-6, atol=1e-7)
                else:  # (b) past max_steps, never active yet, or just trained: still
                    assert torch.equal(p.detach(), old), (layer, i)
    moves = sum(len(m) for _, m in schedule)
    assert helper.layer_updates == moves and helper.param_updates == 2 * moves
    assert helper.cpu_seconds >= 0
    assert helper.summary() == {"scale": 0.5, "max_steps": 2, "param_updates": 2 * moves,
                                "layer_updates": moves, "cpu_seconds": helper.cpu_seconds}
    opt.close()


def _train(steps, helper_kwargs=None, *, explicit=True, **ist):
    model, opt = _setup(**ist)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    helper = InactiveMomentum(opt, **helper_kwargs) if helper_kwargs else None
    for _ in range(steps):
        trained = _step(model, opt, x)
        if helper is not None:
            helper.after_step(opt.param_groups[0]["lr"], trained if explicit else None)
    opt.close()
    return [p.detach().clone() for p in model.parameters()], helper


def test_scale_zero_leaves_every_parameter_as_without_the_helper():
    plain, _ = _train(10)
    zero, helper = _train(10, {"scale": 0.0, "max_steps": 1000})
    assert helper.param_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(plain, zero, strict=True))
    moved, helper = _train(10, {"scale": 1.0, "max_steps": 1})
    assert helper.param_updates > 0
    assert not all(torch.equal(a, b) for a, b in zip(plain, moved, strict=True))


def test_the_trained_set_defaults_to_the_one_the_optimizer_named_as_coming():
    explicit, a = _train(10, {"scale": 1.0, "max_steps": 3})
    default, b = _train(10, {"scale": 1.0, "max_steps": 3}, explicit=False)
    assert a.param_updates == b.param_updates > 0
    assert all(torch.equal(x, y) for x, y in zip(explicit, default, strict=True))


def test_parameters_without_state_are_skipped():
    # "drop" deletes an inactive layer's state: nothing to move on
    _params, helper = _train(6, {"scale": 1.0, "max_steps": 1000}, state_policy="drop")
    assert helper.param_updates == 0 and helper.layer_updates == 0


def test_settings_are_checked():
    _model, opt = _setup()
    with pytest.raises(ValueError, match=">= 0"):
        InactiveMomentum(opt, scale=-1.0, max_steps=1)
    with pytest.raises(TypeError, match="ISTOptimizer"):
        InactiveMomentum(opt.optimizer, scale=1.0, max_steps=1)
    opt.close()
