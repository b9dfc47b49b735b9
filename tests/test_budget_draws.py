"""budget_redraws=: draw again while the active set does not fit memory_budget as it is."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from conftest import lm_batch, lora_model, params_snapshot, train_steps
from hypothesis import given
from hypothesis import strategies as st

from ist_optim import ISTConfig, ISTOptimizer, LayerSampler
from ist_optim.memory.budget import PLANNING_HEADROOM, CheckpointPolicy, planner_for_model


def _budget_for(peak: int) -> int:
    """The smallest budget whose planning limit (the budget less the headroom) holds
    ``peak``."""
    return math.ceil(peak / (1 - PLANNING_HEADROOM)) + 1


# ------------------------------------------------------------------ the sampler's rule
@st.composite
def _samplers(draw):
    num_layers = draw(st.integers(2, 10))
    num_active = draw(st.integers(1, num_layers))
    sampling = draw(st.sampled_from(["importance", "uniform", "depth-aware"]))
    sampler = LayerSampler.from_config(ISTConfig(active_layers=num_active, sampling=sampling),
                                       num_layers, seed=draw(st.integers(0, 2**31)))
    scores = draw(st.lists(st.floats(-3, 3), min_size=num_layers, max_size=num_layers))
    sampler.set_scores(torch.tensor(scores))
    return sampler


def _clone(sampler: LayerSampler) -> LayerSampler:
    twin = LayerSampler(sampler.rule, seed=0)
    twin.load_state_dict({**sampler.state_dict(), "active_layers": [0]})
    return twin


@given(_samplers(), st.integers(0, 6), st.data())
def test_first_accepted_of_redraws_plus_one_draws_else_the_last(sampler, redraws, data):
    allowed = set(data.draw(st.lists(st.integers(0, sampler.num_layers - 1), unique=True)))
    calls: list[list[int]] = []

    def accept(layers: list[int]) -> bool:  # pure: a set fits iff all its layers are allowed
        calls.append(list(layers))
        return set(layers) <= allowed

    reference = _clone(sampler)
    got = sampler.draw_active(accept, redraws)

    draws = [reference.draw_active()]  # the reference loop: draw until accepted or k+1 draws
    while not set(draws[-1]) <= allowed and len(draws) < redraws + 1:
        draws.append(reference.draw_active())
    assert got == draws[-1]
    assert torch.equal(sampler.generator.get_state(), reference.generator.get_state())
    assert calls == draws[:redraws]  # the last of k+1 draws is taken without asking


@given(_samplers(), st.integers(0, 4))
def test_no_predicate_or_no_redraws_is_one_plain_draw(sampler, redraws):
    reference = _clone(sampler)
    assert sampler.draw_active(None, redraws) == reference.draw_active()
    assert sampler.draw_active(lambda _: False, 0) == reference.draw_active()
    assert torch.equal(sampler.generator.get_state(), reference.generator.get_state())


@pytest.mark.parametrize("bad", [-1, True, 1.0, "2"])
def test_sampler_refuses_bad_redraws(bad):
    with pytest.raises(ValueError, match="Invalid redraws"):
        LayerSampler.from_config(ISTConfig(active_layers=2, sampling="uniform"), 4,
                                 seed=0).draw_active(lambda _: True, bad)


# ------------------------------------------------------------------ the policy's question
def test_fits_as_is_is_the_policy_deciding_no_checkpointing():
    model = lora_model(4)
    planner = planner_for_model(model, torch.optim.AdamW(model.parameters()), batch_size=2,
                                seq_len=8)
    peak = CheckpointPolicy(planner, 1).peak([2, 3], [])
    for policy in (CheckpointPolicy(planner, _budget_for(peak)),
                   CheckpointPolicy(planner, peak, headroom=0.0)):
        for active in itertools.combinations(range(4), 2):
            assert policy.fits_as_is(active) == (policy.decide(active).checkpointed == [])
        assert policy.fits_as_is([2, 3]) and not policy.fits_as_is([0, 1])
    # the headroom counts: a budget of exactly the peak leaves the step no room
    assert not CheckpointPolicy(planner, peak).fits_as_is([2, 3])


# ------------------------------------------------------------------ on a tiny Llama
LAYERS, ACTIVE = 6, 2


@pytest.fixture(scope="module")
def high_budget():
    """A budget that the sets whose lowest layer is 3 or higher fit as they are, and
    no set with a lower layer does."""
    model = lora_model(LAYERS)
    planner = planner_for_model(model, torch.optim.AdamW(model.parameters()), batch_size=2,
                                seq_len=8)
    probe = CheckpointPolicy(planner, 1, keeps_all_state=True)  # state_policy "keep" on CPU
    sets = list(itertools.combinations(range(LAYERS), ACTIVE))
    budget = _budget_for(max(probe.peak(s, []) for s in sets if min(s) >= 3))
    policy = CheckpointPolicy(planner, budget, keeps_all_state=True)
    assert [s for s in sets if policy.fits_as_is(s)] == [(3, 4), (3, 5), (4, 5)]
    return budget


def _opt(model, budget, **kwargs):
    kwargs = {"lr": 1e-2, "seed": 0, "sampling": "depth-aware", "active_layers": ACTIVE,
              **kwargs}
    return ISTOptimizer(torch.optim.AdamW, model, memory_budget=budget, memory_shape=(2, 8),
                        **kwargs)


def _train(opt, model, steps, start=0):
    """Steps on fixed batches; returns (active set, checkpointed blocks) of each step."""
    record = []
    for i in range(start, start + steps):
        record.append((opt.active_layers, opt.memory_report()["checkpointed_layers"]))
        model(**lm_batch(seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
    return record


def test_zero_redraws_draws_the_same_sets_as_no_budget(high_budget):
    plain_model = lora_model(LAYERS)
    plain = ISTOptimizer(torch.optim.AdamW, plain_model, lr=1e-2, seed=0,
                         sampling="depth-aware", active_layers=ACTIVE)
    plain_sets = train_steps(plain_model, plain, 25)
    for kwargs in ({}, {"budget_redraws": 0}):
        model = lora_model(LAYERS)
        opt = _opt(model, high_budget, **kwargs)
        record = _train(opt, model, 25)
        assert [active for active, _ in record] == plain_sets
        assert any(ckpt for _, ckpt in record)  # the budget binds: these sets were not redrawn
        assert torch.equal(opt.sampler.generator.get_state(),
                           plain.sampler.generator.get_state())


def test_redraws_checkpoint_less_and_every_layer_still_trains(high_budget):
    share = {}
    for redraws, steps in ((0, 60), (4, 240)):
        model = lora_model(LAYERS)
        opt = _opt(model, high_budget, budget_redraws=redraws)
        record = _train(opt, model, steps)
        share[redraws] = sum(bool(ckpt) for _, ckpt in record[:60]) / 60
        counts = [sum(layer in active for active, _ in record) for layer in range(LAYERS)]
        assert min(counts) >= 1, counts
    assert share[4] < share[0] / 2, share
    assert share[4] > 0  # sets that do not fit are still taken, and checkpointed


def _roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_mid_run_draws_the_same_sets(high_budget):
    full_model = lora_model(LAYERS)
    full = _opt(full_model, high_budget, budget_redraws=3, update_interval=4)
    full_record = _train(full, full_model, 14)

    first_model = lora_model(LAYERS)
    first = _opt(first_model, high_budget, budget_redraws=3, update_interval=4)
    record = _train(first, first_model, 7)
    saved_opt = _roundtrip(first.state_dict())
    saved_model = _roundtrip({k: v.clone() for k, v in first_model.state_dict().items()})

    resumed_model = lora_model(LAYERS)
    resumed_model.load_state_dict(saved_model)
    resumed = _opt(resumed_model, high_budget, budget_redraws=3, update_interval=4, seed=99)
    resumed.load_state_dict(saved_opt)
    record += _train(resumed, resumed_model, 7, start=7)

    assert record == full_record
    full_params = params_snapshot(full_model)
    for name, p in resumed_model.named_parameters():
        assert torch.equal(p, full_params[name]), name


# ------------------------------------------------------------------ construction errors
@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"budget_redraws": -1, "memory_budget": "1GiB"}, ValueError,
     r"^Invalid budget_redraws: -1; expected an int >= 0$"),
    ({"budget_redraws": 2.0, "memory_budget": "1GiB"}, TypeError,
     "budget_redraws must be an int, got 2.0"),
    ({"budget_redraws": True, "memory_budget": "1GiB"}, TypeError,
     "budget_redraws must be an int, got True"),
    ({"budget_redraws": 4}, ValueError,
     "budget_redraws=4 is set but memory_budget is not; pass memory_budget="),
])
def test_bad_redraws_refused_at_construction(kwargs, error, message):
    model = lora_model(4)
    before = params_snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    shape = {"memory_shape": (2, 8)} if "memory_budget" in kwargs else {}
    with pytest.raises(error, match=message) as info:
        ISTOptimizer(torch.optim.AdamW, model, sampling="depth-aware", **shape, **kwargs)
    assert "\n" not in str(info.value)
    assert [p.requires_grad for p in model.parameters()] == flags
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not any(layer.gradient_checkpointing
                   for layer in model.get_base_model().model.layers)
