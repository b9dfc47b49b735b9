"""The active-set schedule: dense_steps, ramp_steps, active_schedule (issue 21)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import lm_batch, lora_model, params_snapshot, train_steps
from hypothesis import given
from hypothesis import strategies as st

from ist_optim import ActiveSchedule, ISTConfig, ISTOptimizer
from ist_optim.memory.budget import CheckpointPolicy, planner_for_model


# ------------------------------------------------------------------ the pure rule
@st.composite
def _schedules(draw):
    num_layers = draw(st.integers(1, 40))
    num_active = draw(st.integers(1, num_layers))
    return ActiveSchedule(num_layers, num_active, draw(st.integers(0, 30)),
                          draw(st.integers(0, 30)))


@given(_schedules(), st.integers(0, 100))
def test_dense_then_ramp_then_the_configured_count(schedule, step):
    count = schedule.count(step)
    assert schedule.num_active <= count <= schedule.num_layers
    if step < schedule.dense_steps:
        assert count == schedule.num_layers
    elif step >= schedule.dense_steps + schedule.ramp_steps:
        assert count == schedule.num_active
    assert schedule.count(step + 1) <= count  # never grows


@given(_schedules())
def test_the_ramp_is_linear_in_the_steps_of_the_ramp(schedule):
    n_l, n_u, dense, ramp = (schedule.num_layers, schedule.num_active, schedule.dense_steps,
                             schedule.ramp_steps)
    for i in range(ramp):
        exact = n_u + (n_l - n_u) * (ramp - i) / (ramp + 1)
        assert schedule.count(dense + i) == math.ceil(exact)


def test_constant_when_off():
    schedule = ActiveSchedule(8, 2)
    assert schedule.is_constant and {schedule.count(s) for s in range(50)} == {2}
    assert not ActiveSchedule(8, 2, dense_steps=1).is_constant


def test_a_rule_takes_counts_and_fractions_and_names_a_bad_value():
    schedule = ActiveSchedule(8, 2, rule=lambda step: 8 if step < 2 else 0.25)
    assert [schedule.count(s) for s in range(4)] == [8, 8, 2, 2]
    with pytest.raises(ValueError, match=r"active_schedule\(3\)=9"):
        ActiveSchedule(8, 2, rule=lambda step: 9).count(3)
    with pytest.raises(TypeError, match=r"active_schedule\(0\)"):
        ActiveSchedule(8, 2, rule=lambda step: "all").count(0)


# ------------------------------------------------------------------ options
@pytest.mark.parametrize(("options", "error", "message"), [
    ({"dense_steps": -1}, ValueError, "Invalid dense_steps: -1"),
    ({"dense_steps": 2.5}, TypeError, "dense_steps must be an int"),
    ({"ramp_steps": True}, TypeError, "ramp_steps must be an int"),
    ({"active_schedule": 3}, TypeError, "active_schedule must be callable"),
    ({"active_schedule": lambda s: 2, "dense_steps": 5}, ValueError,
     "active_schedule is set together with dense_steps=5"),
])
def test_bad_values_are_refused_at_construction_in_one_line(options, error, message):
    with pytest.raises(error, match=message) as info:
        ISTOptimizer(torch.optim.AdamW, lora_model(4), lr=1e-2, **options)
    assert "\n" not in str(info.value)


def test_a_rule_asking_for_too_many_layers_fails_at_the_draw_that_asks():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0,
                       active_schedule=lambda step: 2 if step < 1 else 5)
    model(**lm_batch()).loss.backward()
    with pytest.raises(ValueError, match=r"active_schedule\(1\)=5"):
        opt.step()


# ------------------------------------------------------------------ in the optimizer
def test_dense_steps_train_every_layer_then_active_layers():
    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=2,
                       dense_steps=3, ramp_steps=2)
    sets = train_steps(model, opt, 7)
    assert [len(s) for s in sets] == [6, 6, 6, 5, 4, 2, 2]
    assert sets[0] == list(range(6)) and opt.num_active == 2


def test_dense_steps_update_every_layer_like_the_inner_optimizer():
    """A dense step is the inner optimizer's step on every layer: the same parameters as
    plain AdamW on the same batches."""
    model, reference = lora_model(4), lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, dense_steps=3)
    plain = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, opt, 3)
    for step in range(3):
        reference(**lm_batch(seed=step)).loss.backward()
        plain.step()
        plain.zero_grad()
    got, want = params_snapshot(model), params_snapshot(reference)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("options", [
    {"dense_steps": 4, "ramp_steps": 3},
    {"dense_steps": 3, "estimator": "first-order", "sampling": "depth-aware",
     "update_interval": 2},
    {"active_schedule": lambda step: 4 if step % 3 == 0 else 1, "state_policy": "offload"},
])
def test_resume_in_the_middle_of_the_warm_up_is_exact(options):
    kwargs = {"lr": 1e-2, "seed": 3, "active_layers": 2, **options}
    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, **kwargs)
    sets = train_steps(model, opt, 9)
    final = params_snapshot(model)

    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, **kwargs)
    first = train_steps(model, opt, 2)  # inside the dense phase
    saved, weights = opt.state_dict(), params_snapshot(model)
    model = lora_model(6)
    model.load_state_dict(weights)
    opt = ISTOptimizer(torch.optim.AdamW, model, **dict(kwargs, seed=99))
    opt.load_state_dict(saved)
    assert first + train_steps(model, opt, 7, start=2) == sets
    for name, value in params_snapshot(model).items():
        assert torch.equal(final[name], value), name


def test_config_object_is_the_same_as_keywords():
    a_model, b_model = lora_model(4), lora_model(4)
    a = ISTOptimizer(torch.optim.AdamW, a_model, lr=1e-2, seed=0, dense_steps=2)
    b = ISTOptimizer(torch.optim.AdamW, b_model, config=ISTConfig(seed=0, dense_steps=2),
                     lr=1e-2)
    assert train_steps(a_model, a, 5) == train_steps(b_model, b, 5)
    with pytest.raises(ValueError, match=r"config= is given together with the IST options"):
        ISTOptimizer(torch.optim.AdamW, lora_model(4), config=ISTConfig(), lr=1e-2,
                     active_layers=2)


def test_dense_steps_under_a_budget_checkpoint_what_they_need():
    model = lora_model(4)
    planner = planner_for_model(model, torch.optim.AdamW(model.parameters()), batch_size=2,
                                seq_len=8)
    policy = CheckpointPolicy(planner, 1, keeps_all_state=True)
    # a budget that holds two active layers as they are, but not all four
    budget = math.ceil(policy.peak([2, 3], []) / 0.98) + 1
    assert policy.peak([0, 1, 2, 3], []) > budget
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=2,
                       sampling="uniform", dense_steps=2, memory_budget=budget,
                       memory_planner=planner)
    checkpointed = []
    for step in range(4):
        checkpointed.append(opt.memory_report()["checkpointed_layers"])
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert checkpointed[0] and checkpointed[1]  # four layers: some blocks recompute
    assert all(policy.peak(list(range(4)), c) <= budget for c in checkpointed[:2])


def test_first_order_scores_learn_from_the_dense_steps():
    """With every layer active, the training backward reaches every layer, so the first
    first-order round scores all of them."""
    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=1,
                       estimator="first-order", dense_steps=4, update_interval=4)
    train_steps(model, opt, 4)
    assert opt.last_round is not None and opt.last_round["step"] == 4
    assert sorted(i for (i,) in opt.last_round["sets"]) == list(range(6))


def test_the_trainer_callback_logs_the_scheduled_count():
    pytest.importorskip("transformers")
    from ist_optim.integrations import ISTCallback

    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=1,
                       dense_steps=2)
    logged = []
    for step in range(3):
        logged.append(ISTCallback(log_layers=False).log_entries(opt)["ist/num_active"])
        train_steps(model, opt, 1, start=step)
    assert logged == [4.0, 4.0, 1.0]


def test_the_ramp_count_is_exact_where_a_float_product_rounds_up():
    """(26 - 1) * 14 / 25 is 14 exactly; in floats 25 * (14 / 25) is 14.000000000000002,
    whose ceiling gave one layer too many (found by hypothesis)."""
    schedule = ActiveSchedule(num_layers=26, num_active=1, dense_steps=0, ramp_steps=24)
    assert schedule.count(10) == 15
