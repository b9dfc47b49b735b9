"""memory_budget=: per-step activation checkpointing of exactly the blocks a step needs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import lm_batch, lora_model
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

import ist_optim.memory.budget as budget_module
from ist_optim import ISTOptimizer, MemoryPlanner
from ist_optim.memory.budget import (
    PLANNING_HEADROOM,
    WORKSPACE_THREADS,
    CheckpointPolicy,
    cuda_workspace_bytes,
    parse_memory_budget,
    planner_for_model,
)

UNITS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


# ------------------------------------------------------------------ the budget string
def test_parse_examples():
    assert parse_memory_budget("24GiB") == 24 * 2**30
    assert parse_memory_budget(" 512 MiB ") == 512 * 2**20
    assert parse_memory_budget("1.5GB") == 1_500_000_000
    assert parse_memory_budget(4096) == 4096


@pytest.mark.parametrize("bad", ["", "24", "GiB", "24 gigs", "24gib", "-1GiB", "0GiB",
                                 "1e9B", "24GiB extra", "0.1B", "2..5GiB", 0, -5])
def test_bad_budgets_raise_one_line_value_errors(bad):
    with pytest.raises(ValueError, match="Invalid memory_budget") as info:
        parse_memory_budget(bad)
    assert "\n" not in str(info.value) and repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [True, 1.5e9, None, [24]])
def test_budget_of_another_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="memory_budget must be an int"):
        parse_memory_budget(bad)


@given(st.integers(1, 10**7), st.sampled_from(sorted(UNITS)), st.sampled_from(["", " "]),
       st.integers(0, 999))
def test_parse_is_exact_for_every_unit(number, unit, space, thousandths):
    assert parse_memory_budget(f"{number}{space}{unit}") == number * UNITS[unit]
    expected = (number * 1000 + thousandths) * UNITS[unit] // 1000
    assert parse_memory_budget(f"{number}.{thousandths:03d}{unit}") == expected


@given(st.text(max_size=12))
def test_any_string_parses_or_raises_a_one_line_value_error(text):
    try:
        value = parse_memory_budget(text)
    except ValueError as err:
        assert "\n" not in str(err)
    else:
        assert isinstance(value, int) and value >= 1


# ------------------------------------------------------------------ HF models
@pytest.fixture(scope="module")
def planner():
    """The planner ``memory_shape=(2, 8)`` builds for ``lora_model(4)`` (built once)."""
    model = lora_model(4)
    built = planner_for_model(model, torch.optim.AdamW(model.parameters()), batch_size=2,
                              seq_len=8)
    assert built.method == "lora" and built.settings["lora_rank"] == 4
    return built


def _budget_opt(model, budget, planner=None, **kwargs):
    kwargs = {"lr": 1e-2, "seed": 0, "sampling": "uniform", "active_layers": 2, **kwargs}
    where = {"memory_shape": (2, 8)} if planner is None else {"memory_planner": planner}
    return ISTOptimizer(torch.optim.AdamW, model, memory_budget=budget, **where, **kwargs)


def _layers(model):
    return model.get_base_model().model.layers


def _train(opt, model, steps):
    """Steps on fixed batches; returns (active set, checkpointed blocks) of each step."""
    record = []
    for i in range(steps):
        record.append((opt.active_layers, opt.memory_report()["checkpointed_layers"]))
        # use_cache=False as under checkpointing: transformers 4.x builds another attention
        # mask without a cache, so both sides must agree for their bits to
        model(**lm_batch(seed=i), use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    return record


def test_budget_that_fits_everything_checkpoints_nothing(planner):
    model = lora_model(4)
    opt = _budget_opt(model, "1GiB")  # builds its planner from the model and memory_shape
    assert opt.memory_budget.policy.planner.costs == planner.costs
    record = _train(opt, model, 4)
    assert all(ckpt == [] for _, ckpt in record)
    assert not any(layer.gradient_checkpointing for layer in _layers(model))
    report = opt.memory_report()
    assert report["memory_budget"] == 2**30 and 0 < report["predicted_peak_bytes"] < 2**30


def _count_calls(module):
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _budget_for(peak):
    """The smallest budget whose planning limit (less the headroom) holds ``peak``."""
    return math.ceil(peak / (1 - PLANNING_HEADROOM)) + 1


def test_tight_budget_checkpoints_exactly_what_the_policy_says(planner):
    policy = CheckpointPolicy(planner, 1, keeps_all_state=True)  # state_policy "keep"
    active = [1, 2]
    peak = policy.peak(active, [1])
    assert policy.peak(active, []) > _budget_for(peak)  # without checkpointing it does not fit
    model = lora_model(4)
    budget = _budget_for(peak)
    opt = _budget_opt(model, budget, planner)
    opt.set_active_layers(active)
    report = opt.memory_report()
    assert report["checkpointed_layers"] == [1]
    assert report["predicted_peak_bytes"] == peak and report["memory_budget"] == budget
    assert [layer.gradient_checkpointing for layer in _layers(model)] == [False, True,
                                                                         False, False]
    # block 1 is recomputed in backward (its MLP runs twice), block 2 is not
    calls = [_count_calls(layer.mlp) for layer in _layers(model)]
    model(**lm_batch()).loss.backward()
    assert [c[0] for c in calls] == [1, 2, 1, 1]


def test_headroom_plans_each_step_below_the_budget(planner):
    """Planning to 100% of the budget put a SmolLM2 step 1.5 MiB over its 950 MiB budget
    (the planner was 0.3% low): a step fits only within the budget less the headroom."""
    exact = CheckpointPolicy(planner, 1).peak([1, 2], [])
    bare = CheckpointPolicy(planner, exact, headroom=0.0).decide([1, 2])
    assert bare.checkpointed == [] and bare.fits
    planned = CheckpointPolicy(planner, exact)  # the default headroom
    assert planned.limit == int(exact * (1 - PLANNING_HEADROOM)) < exact
    decision = planned.decide([1, 2])
    assert decision.checkpointed and decision.peak_bytes <= planned.limit and decision.fits
    assert CheckpointPolicy(planner, _budget_for(exact)).decide([1, 2]).checkpointed == []
    for bad in (-0.1, 1.0, float("nan"), True, "2%"):
        with pytest.raises(ValueError, match="Invalid headroom"):
            CheckpointPolicy(planner, exact, headroom=bad)


def test_reserve_for_cuda_workspaces_lowers_the_limit(planner):
    """On CUDA the budget holds the cuBLAS workspaces (max_memory_allocated counts them,
    no tensor of the step owns them): a step fits within the budget less the headroom
    and less that reserve."""
    exact = CheckpointPolicy(planner, 1).peak([1, 2], [])
    budget = _budget_for(exact)
    assert CheckpointPolicy(planner, budget).decide([1, 2]).checkpointed == []
    reserved = CheckpointPolicy(planner, budget, reserve_bytes=4096)
    assert reserved.limit == int(budget * (1 - PLANNING_HEADROOM)) - 4096
    decision = reserved.decide([1, 2])
    assert decision.checkpointed and decision.peak_bytes <= reserved.limit
    for bad in (-1, 1.5, True, "64MiB"):
        with pytest.raises(ValueError, match="Invalid reserve_bytes"):
            CheckpointPolicy(planner, budget, reserve_bytes=bad)


@pytest.mark.parametrize(("capability", "env", "per_thread"), [
    ((9, 0), {}, 32 * 2**20),  # Hopper: torch's ":4096:8"
    ((8, 0), {}, 8 * 2**20 + 128 * 2**10),  # elsewhere: ":4096:2:16:8"
    ((9, 0), {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}, 128 * 2**10),  # deterministic setting
    ((9, 0), {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0"}, 64 * 2**20),  # Lt's own, as large
    ((9, 0), {"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "0", "CUBLASLT_WORKSPACE_SIZE": "1024"},
     33 * 2**20),
])
def test_cuda_workspace_bytes(monkeypatch, capability, env, per_thread):
    for name in ("CUBLAS_WORKSPACE_CONFIG", "TORCH_CUBLASLT_UNIFIED_WORKSPACE",
                 "CUBLASLT_WORKSPACE_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert cuda_workspace_bytes(torch.device("cuda", 1)) == WORKSPACE_THREADS * per_thread
    assert cuda_workspace_bytes("cpu") == 0


def test_the_budget_reserves_the_workspaces_of_the_parameters_device(monkeypatch):
    seen = []
    monkeypatch.setattr(budget_module, "cuda_workspace_bytes",
                        lambda device: seen.append(device) or 12345)
    opt = _budget_opt(lora_model(4), "1GiB")
    assert seen == [torch.device("cpu")]
    assert opt.memory_budget.policy.reserve_bytes == 12345


def test_policy_order_and_greedy(planner):
    policy = CheckpointPolicy(planner, 1)
    assert policy.order([2, 3]) == [2, 3]
    assert policy.order([1, 3]) == [1, 3, 2]
    assert CheckpointPolicy(planner, 1, cut_backward=False).order([1, 3]) == [1, 3, 0, 2]
    one = policy.peak([1, 3], [1])
    assert policy.peak([1, 3], []) > one
    assert CheckpointPolicy(planner, one, headroom=0.0).decide([1, 3]).checkpointed == [1]
    # the top block is recomputed as backward starts: checkpointing it raises the peak, so
    # it is skipped, and block 2 (frozen, but backward runs through it) is taken instead
    assert policy.peak([1, 3], [1, 3]) > one
    assert policy.peak([1, 3], [1, 2]) < one
    with pytest.warns(UserWarning, match="even with checkpointing"):
        decision = policy.decide([1, 3])
    assert decision.checkpointed == [1, 2] and not decision.fits
    assert decision.peak_bytes == policy.peak([1, 3], [1, 2])
    assert decision.peak_bytes <= policy.peak([1, 3], [0, 1, 2, 3])


def test_a_decision_is_planned_once_per_active_set(planner, monkeypatch):
    """Planning is arithmetic on fixed costs: a set seen before is a lookup (issue 35: the
    cost of planning), the answer the same, and a caller changing its copy changes nothing."""
    from ist_optim.memory import budget as budget_module

    policy = CheckpointPolicy(planner, policy_budget(planner), headroom=0.0)
    calls = []
    estimate = planner.estimate
    monkeypatch.setattr(planner, "estimate", lambda *a, **k: calls.append(1) or estimate(*a, **k))
    first = policy.decide([3, 1])
    planned = len(calls)
    first.checkpointed.append(99)
    again = policy.decide([1, 3, 3])
    assert planned > 0 and len(calls) == planned
    assert again == CheckpointPolicy(planner, policy.budget, headroom=0.0).decide([1, 3])
    monkeypatch.setattr(budget_module, "DECISIONS_KEPT", 1)
    other = CheckpointPolicy(planner, policy.budget, headroom=0.0)
    other.decide([1]), other.decide([2])
    before = len(calls)
    other.decide([2])  # past the bound: planned again, same answer
    assert len(calls) > before
    policy.limit = -1  # nothing fits now: planned anew, not the kept answer
    with pytest.warns(UserWarning, match="even with checkpointing"):
        assert not policy.decide([1, 3]).fits


def policy_budget(planner):
    """A budget that needs one block checkpointed when layers 1 and 3 train."""
    return planner.estimate([1, 3], gradient_checkpointing=[1]).peak_bytes


def test_budget_below_everything_warns_once(planner):
    model = lora_model(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = _budget_opt(model, 1, planner)
        record = _train(opt, model, 3)
    policy = opt.memory_budget.policy
    for active, ckpt in record:
        assert ckpt and policy.peak(active, ckpt) < policy.peak(active, [])
    assert sum("even with checkpointing" in str(w.message) for w in caught) == 1


def test_parameters_bit_identical_to_always_checkpointing(planner):
    probe = CheckpointPolicy(planner, 1, keeps_all_state=True)
    budget = _budget_for(probe.peak([2, 3], []))  # the top pair fits as it is; lower do not
    model = lora_model(4)
    opt = _budget_opt(model, budget, planner)
    record = _train(opt, model, 8)
    assert any(ckpt == [] for _, ckpt in record) and any(ckpt for _, ckpt in record)

    reference = lora_model(4)
    reference.get_base_model().gradient_checkpointing_enable(  # what memory_budget runs
        gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_opt = ISTOptimizer(torch.optim.AdamW, reference, lr=1e-2, seed=0, sampling="uniform",
                           active_layers=2)
    ref_record = _train(ref_opt, reference, 8)
    assert [a for a, _ in record] == [a for a, _ in ref_record]
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_close_restores_the_layers(planner):
    model = lora_model(4)
    with pytest.warns(UserWarning, match="even with checkpointing"):
        opt = _budget_opt(model, 1, planner)
    assert any(layer.gradient_checkpointing for layer in _layers(model))
    opt.close()
    assert not any(layer.gradient_checkpointing for layer in _layers(model))
    assert not any("_gradient_checkpointing_func" in layer.__dict__ for layer in _layers(model))


def test_model_checkpointing_is_replaced_with_a_warning(planner):
    model = lora_model(4)
    model.get_base_model().gradient_checkpointing_enable()
    with pytest.warns(UserWarning, match="gradient checkpointing is replaced by memory_budget"):
        opt = _budget_opt(model, "1GiB", planner)
    assert opt.memory_report()["checkpointed_layers"] == []
    assert not any(layer.gradient_checkpointing for layer in _layers(model))


# ------------------------------------------------------------------ plain block lists
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.down(torch.tanh(self.up(x)))


class Net(nn.Module):
    def __init__(self, checkpoint_all: bool = False) -> None:
        super().__init__()
        gen = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(8) for _ in range(4))
        torch.random.set_rng_state(gen)
        self.checkpoint_all = checkpoint_all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_all else block(x)
        return x


def _plain_planner():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, vocab_size=64)
    return MemoryPlanner(config, batch_size=2, seq_len=8, dtype=torch.float32)


def _plain_run(net, steps, **kwargs):
    opt = ISTOptimizer(torch.optim.AdamW, net, layers=list(net.blocks), lr=1e-2, seed=0,
                       sampling="uniform", active_layers=2, **kwargs)
    gen = torch.Generator().manual_seed(0)
    record = []
    for _ in range(steps):
        record.append((opt.active_layers, opt.memory_report()["checkpointed_layers"]))
        for block in net.blocks:
            block.calls = 0
        net(torch.randn(4, 8, generator=gen)).pow(2).mean().backward()
        record[-1] += ([block.calls for block in net.blocks],)
        opt.step()
        opt.zero_grad()
    return record, opt


def test_plain_blocks_bit_identical_and_recomputed():
    planner = _plain_planner()
    budget = _budget_for(CheckpointPolicy(planner, 1, keeps_all_state=True).peak([2, 3], []))
    net = Net()
    record, opt = _plain_run(net, 8, memory_budget=budget, memory_planner=planner)
    assert any(ckpt == [] for _, ckpt, _ in record) and any(ckpt for _, ckpt, _ in record)
    for active, ckpt, calls in record:  # a checkpointed block runs forward twice
        assert calls == [2 if i in ckpt else 1 for i in range(4)], (active, ckpt)
    reference = Net(checkpoint_all=True)
    ref_record, _ = _plain_run(reference, 8)
    assert [a for a, _, _ in record] == [a for a, _, _ in ref_record]
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    # close() gives the blocks their own forward back
    opt.close()
    assert all("forward" not in block.__dict__ for block in net.blocks)


# ------------------------------------------------------------------ construction errors
def test_budget_needs_a_shape_or_a_planner():
    with pytest.raises(ValueError, match="memory_shape=\\(batch_size, seq_len\\)"):
        ISTOptimizer(torch.optim.AdamW, lora_model(4), memory_budget="1GiB")


def test_model_the_planner_cannot_describe():
    net = Net()
    with pytest.raises(ValueError, match="Llama-style causal LMs.*memory_planner="):
        ISTOptimizer(torch.optim.AdamW, net, layers=list(net.blocks), memory_budget="1GiB",
                     memory_shape=(2, 8))


def test_planner_of_another_depth():
    net = Net()
    planner = MemoryPlanner(_plain_planner().config.__class__(
        hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        vocab_size=64), batch_size=2, seq_len=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="describes 6 blocks but the optimizer trains 4"):
        ISTOptimizer(torch.optim.AdamW, net, layers=list(net.blocks), memory_budget="1GiB",
                     memory_planner=planner)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"memory_budget": "24 gigs", "memory_shape": (2, 8)}, "Invalid memory_budget"),
    ({"memory_budget": "1GiB", "memory_shape": (2, 0)}, "Invalid memory_shape"),
    ({"memory_shape": (2, 8)}, "memory_shape is set but memory_budget is not"),
    ({"memory_budget": "1GiB", "memory_shape": (2, 8), "freeze_inactive": False},
     "needs freeze_inactive=True"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        ISTOptimizer(torch.optim.AdamW, lora_model(4), **kwargs)
    assert "\n" not in str(info.value)


def test_take_back_after_the_model_switched_checkpointing_on(planner):
    model = lora_model(4)
    opt = _budget_opt(model, "1GiB", planner)
    budget = opt.memory_budget
    assert budget.take_back() is False  # nothing changed
    model.get_base_model().gradient_checkpointing_enable()  # what the HF Trainer does
    assert all(layer.gradient_checkpointing for layer in _layers(model))
    assert budget.take_back() is True
    assert not any(layer.gradient_checkpointing for layer in _layers(model))
    assert budget.take_back() is False


@pytest.mark.parametrize("inner, kwargs", [
    (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}), (torch.optim.Adagrad, {"lr": 1e-2})])
def test_full_fine_tuning_every_layer_under_a_budget_makes_the_plain_updates(inner, kwargs):
    """Issue 35 item 2: ``memory_budget`` with every layer active is the fastest way to fit
    for any inner optimizer and for full fine-tuning too: it checkpoints some blocks, not
    all, and the weights after each step are those of the plain inner optimizer over every
    parameter with the model's checkpointing on every block (8 x 64 tokens: activations,
    not weights, set the peak)."""
    from conftest import tiny_llama

    def run(model, opt, steps=4):
        for i in range(steps):
            model(**lm_batch(batch=8, seq=64, seed=i), use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad()

    probe_model = tiny_llama(4)
    probe = ISTOptimizer(inner, probe_model, active_layers=1.0, sampling="uniform",
                         memory_budget="1GiB", memory_shape=(8, 64), **kwargs).memory_budget
    everything = list(range(4))
    loose, tight = probe.policy.peak(everything, []), probe.policy.peak(everything, everything)
    budget = _budget_for((loose + tight) // 2)
    model = tiny_llama(4)
    with warnings.catch_warnings():  # the budget fits: no warning that it does not
        warnings.filterwarnings("error", message=".*even with checkpointing")
        opt = ISTOptimizer(inner, model, active_layers=1.0, sampling="uniform",
                           memory_budget=budget, memory_shape=(8, 64), **kwargs)
        run(model, opt)
    checkpointed = opt.memory_report()["checkpointed_layers"]
    assert 0 < len(checkpointed) < 4, checkpointed

    reference = tiny_llama(4)
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run(reference, inner(reference.parameters(), **kwargs))
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name
