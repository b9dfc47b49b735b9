"""Saved state (``ist_optim.core.checkpoint``, ``ist_optim.distributed.checkpoint``): the DCP round
trip keeps offloaded state, and a load validates everything before it changes anything.

(These began as reproductions of the defects a review found in issue 10; the other
reproductions live with the module they test: test_groups, test_wrapper, test_rounds,
test_peft_methods, test_config, test_backward.)
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import lora_model, train_steps
from fake_streams import FakeStreams

import ist_optim.memory.residency as residency_module
from ist_optim import ISTOptimizer, state_bytes
from ist_optim.distributed import get_optimizer_state_dict, set_optimizer_state_dict

_train = train_steps


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# 1. DCP round trip with state_policy="offload" keeps every layer's moments ---------------
def test_dcp_round_trip_with_offload_keeps_inactive_layers_state():
    kwargs = dict(lr=1e-2, seed=3, active_layers=2, update_interval=3, state_policy="offload")
    full_model = lora_model(6)
    full = ISTOptimizer(torch.optim.AdamW, full_model, **kwargs)
    _train(full_model, full, 10)

    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, **kwargs)
    _train(model, opt, 6)
    saved = get_optimizer_state_dict(model, opt)
    with_state = {k for k, v in saved["state"].items() if v}
    assert len(with_state) == len(opt.state_dict()["state"])  # offloaded layers included
    assert len(with_state) > sum(len(opt.layer_groups.params[i]) for i in opt.active_layers)
    saved = _roundtrip(saved)

    resumed_model = lora_model(6)
    resumed_model.load_state_dict(model.state_dict())
    resumed = ISTOptimizer(torch.optim.AdamW, resumed_model, **dict(kwargs, seed=99))
    set_optimizer_state_dict(resumed_model, resumed, saved)
    assert resumed.memory_report()["state_bytes_offloaded"] == \
        opt.memory_report()["state_bytes_offloaded"]
    _train(resumed_model, resumed, 4, start=6)
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters(),
                            strict=True):
        assert torch.equal(a, b), name


# 2. load_state_dict validates everything, then applies -----------------------------------
def _snapshot(opt, model):
    return (copy.deepcopy(opt.state_dict()), opt.active_layers,
            [p.requires_grad for p in model.parameters()])


def _assert_unchanged(before, after):
    state_a, active_a, flags_a = before
    state_b, active_b, flags_b = after
    assert active_a == active_b and flags_a == flags_b
    assert torch.equal(state_a["ist"]["sampler"]["scores"], state_b["ist"]["sampler"]["scores"])
    assert torch.equal(state_a["ist"]["sampler"]["generator_state"],
                       state_b["ist"]["sampler"]["generator_state"])
    assert state_a["ist"]["sampler"]["num_steps"] == state_b["ist"]["sampler"]["num_steps"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for key, entry in state_a["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, state_b["state"][key][name])


CORRUPTIONS = {
    "scores-string": (lambda ist: ist["sampler"].update(scores="oops"), "scores"),
    "scores-length": (lambda ist: ist["sampler"].update(scores=torch.zeros(3)), "scores"),
    "scores-nan": (lambda ist: ist["sampler"].update(
        scores=torch.full((6,), float("nan"), dtype=torch.float64)), "scores"),
    "active-out-of-range": (lambda ist: ist["sampler"].update(active_layers=[0, 9]),
                            "active_layers"),
    "active-duplicate": (lambda ist: ist["sampler"].update(active_layers=[1, 1]),
                         "active_layers"),
    "generator": (lambda ist: ist["sampler"].update(
        generator_state=torch.zeros(3, dtype=torch.uint8)), "generator_state"),
    "steps": (lambda ist: ist["sampler"].update(num_steps=-1), "num_steps"),
    "rounds": (lambda ist: ist["rounds"].update(skipped_rounds="x"), "skipped_rounds"),
    "layers": (lambda ist: ist.pop("layers"), "layers"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_is_refused_and_changes_nothing(corruption):
    change, named = CORRUPTIONS[corruption]
    source_model = lora_model(6)
    source = ISTOptimizer(torch.optim.AdamW, source_model, lr=1e-2, seed=1, active_layers=2,
                          update_interval=2)
    _train(source_model, source, 5)
    bad = copy.deepcopy(source.state_dict())
    change(bad["ist"])

    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=2, active_layers=2,
                       update_interval=2)
    _train(model, opt, 3)
    before = _snapshot(opt, model)
    with pytest.raises(ValueError, match=named):
        opt.load_state_dict(bad)
    _assert_unchanged(before, _snapshot(opt, model))


def test_inner_optimizer_mismatch_is_refused_before_ist_state_changes():
    source_model = lora_model(6)
    source = ISTOptimizer(torch.optim.AdamW, source_model, lr=1e-2, seed=1, active_layers=2)
    _train(source_model, source, 3)
    bad = source.state_dict()
    bad["param_groups"] = bad["param_groups"] * 2  # torch refuses: 2 groups vs 1
    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=2, active_layers=2)
    before = _snapshot(opt, model)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    _assert_unchanged(before, _snapshot(opt, model))


# 3. Resuming under "offload" holds one inactive layer's state at a time ------------------
@pytest.mark.parametrize("path", ["state_dict", "dcp"])
def test_resume_under_offload_holds_one_inactive_layer_at_a_time(path, monkeypatch):
    """Full fine-tuning with "offload" is used where every layer's state does not fit on
    the device: loading a checkpoint must not put it all there first. The inner optimizer
    (the device) holds at most the active layers' and the outside group's state plus one
    other layer's after every load it does; the offload's copies go through the
    delayed-copy fake, and the resumed run equals the uninterrupted one."""
    monkeypatch.setattr(residency_module, "CudaStreams", FakeStreams)

    def optimizer(model, **changes):
        opt = ISTOptimizer(torch.optim.AdamW, model, **dict(kwargs, **changes))
        opt.activator.residency.streams.watch(opt.optimizer)
        return opt

    kwargs = dict(lr=1e-2, seed=3, active_layers=2, update_interval=3, state_policy="offload")
    full_model = lora_model(6)
    full = optimizer(full_model)
    _train(full_model, full, 12)

    model = lora_model(6)
    opt = optimizer(model)
    _train(model, opt, 8)
    groups = opt.layer_groups
    with opt.full_state() as inner:
        per_layer = [state_bytes(inner.state[p] for p in params if p in inner.state)
                     for params in groups.params]
        outside = state_bytes(inner.state[p] for p in groups.outside if p in inner.state)
    assert all(per_layer)  # every layer was trained: every layer has state to load
    active = opt.active_layers
    bound = outside + sum(per_layer[i] for i in active) + max(
        b for i, b in enumerate(per_layer) if i not in active)
    saved = _roundtrip(get_optimizer_state_dict(model, opt) if path == "dcp"
                       else opt.state_dict())

    resumed_model = lora_model(6)
    resumed_model.load_state_dict(model.state_dict())
    resumed = optimizer(resumed_model, seed=99)
    held: list[int] = []
    resumed.optimizer.register_load_state_dict_post_hook(
        lambda inner: held.append(state_bytes(inner.state.values())))
    if path == "dcp":
        set_optimizer_state_dict(resumed_model, resumed, saved)
    else:
        resumed.load_state_dict(saved)
    assert len(held) == 1 + 6 - len(active)  # one load per inactive layer, then the rest
    assert max(held) <= bound < sum(per_layer) + outside, (held, bound)
    assert resumed.memory_report()["state_bytes_offloaded"] == \
        opt.memory_report()["state_bytes_offloaded"]
    _train(resumed_model, resumed, 4, start=8)
    for (name, a), b in zip(full_model.named_parameters(), resumed_model.parameters(),
                            strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ the entry's composition
class _Part:
    def __init__(self, key: str, value: int = 0):
        self.key, self.value, self.checked = key, value, []

    def state_dict(self):
        return {self.key: self.value}

    def check_state(self, state):
        self.checked.append(dict(state))
        if not isinstance(state.get(self.key), int):
            raise ValueError(f"bad {self.key}")

    def load_state_dict(self, state):
        self.value = state[self.key]


def test_a_shared_entry_merges_its_owners_and_each_checks_and_loads_its_keys():
    from ist_optim.core.checkpoint import (
        SharedEntry,
        apply_ist_entry,
        ist_entry,
        layer_signature,
        validate_ist_entry,
    )

    a, b = _Part("a", 1), _Part("b", 2)
    signature = layer_signature(["h.0"], [4])
    entry = ist_entry(signature, {"sampler": SharedEntry(a, b), "rounds": None})
    assert entry["sampler"] == {"a": 1, "b": 2}
    entry["sampler"] = {"a": 5, "b": "x"}
    with pytest.raises(ValueError, match="bad b"):
        validate_ist_entry(entry, signature, {"sampler": SharedEntry(a, b)})
    assert (a.value, b.value) == (1, 2)  # nothing loaded
    entry["sampler"] = {"a": 5, "b": 6}
    apply_ist_entry(validate_ist_entry(entry, signature, {"sampler": SharedEntry(a, b)}),
                    {"sampler": SharedEntry(a, b)})
    assert (a.value, b.value) == (5, 6)
    with pytest.raises(RuntimeError, match=r"_Part writes \['a'\], which another owner"):
        SharedEntry(a, _Part("a")).state_dict()


def test_the_rule_name_older_writers_kept_at_the_top_goes_to_the_sampler():
    from ist_optim.core.checkpoint import upgrade_ist_entry

    v2 = {"format_version": 2, "layers": {}, "sampling": "uniform", "sampler": {"seed": 0},
          "rounds": None}
    assert upgrade_ist_entry(v2)["sampler"] == {"seed": 0, "sampling": "uniform"}
    current = {**v2, "sampler": {"seed": 0, "sampling": "importance"}}
    assert upgrade_ist_entry(current)["sampler"]["sampling"] == "importance"  # its own wins
    v1 = {"format_version": 1, "num_layers": 1, "layer_names": ["h.0"], "layer_numels": [4],
          "active_layers": [0], "num_steps": 3, "seed": 0, "sampling": "depth-aware"}
    assert upgrade_ist_entry(v1)["sampler"]["sampling"] == "depth-aware"
    del v1["sampling"]
    assert "sampling" not in upgrade_ist_entry(v1)["sampler"]
