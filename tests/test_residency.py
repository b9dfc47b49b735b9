"""Optimizer-state residency: keep / offload / drop, exactness, flat memory, reports."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, lora_model
from torch import nn

from ist_optim import ISTOptimizer, StateResidency
from ist_optim.memory.residency import resolve_state_policy


def _run(policy, optimizer_cls=torch.optim.AdamW, steps=8, **kwargs):
    model = lora_model(6)
    opt = ISTOptimizer(optimizer_cls, model, seed=4, update_interval=3, state_policy=policy,
                       **kwargs)
    for step in range(steps):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _bnb8():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit


@pytest.mark.parametrize("inner", ["adamw", "sgd", "adamw8bit"])
def test_offload_is_bit_identical_to_keep(inner):
    cls, kwargs = {
        "adamw": (torch.optim.AdamW, dict(lr=1e-2)),
        "sgd": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
        "adamw8bit": (None, dict(lr=1e-2, min_8bit_size=16)),
    }[inner]
    cls = cls or _bnb8()
    model_keep, opt_keep = _run("keep", cls, **kwargs)
    model_off, opt_off = _run("offload", cls, **kwargs)
    for (n, a), (_, b) in zip(model_keep.named_parameters(), model_off.named_parameters(),
                              strict=True):
        assert torch.equal(a, b), n
    assert opt_off.memory_report()["state_bytes_offloaded"] > 0
    # the checkpoint of an offloading run holds exactly the keep run's state
    sd_keep, sd_off = opt_keep.state_dict(), opt_off.state_dict()
    assert sd_keep["state"].keys() == sd_off["state"].keys()
    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    assert same(sd_keep["state"], sd_off["state"])


def test_inner_state_holds_only_active_layers_under_offload_and_drop():
    for policy in ("offload", "drop"):
        model, opt = _run(policy, lr=1e-2)
        active = {id(p) for p in opt.groups.layer_params(opt.active_layers)}
        outside = {id(p) for p in opt.groups.outside}
        assert {id(p) for p in opt.optimizer.state} <= active | outside
    model, opt = _run("keep", lr=1e-2)
    assert len(opt.optimizer.state) > len(opt.groups.layer_params(opt.active_layers))


def test_drop_restarts_state_of_reactivated_layers():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, sampling="uniform",
                       state_policy="drop", active_layers=1)
    previous: list[int] = []
    restarts = continues = 0
    for step in range(12):
        layer = opt.active_layers[0]
        p = opt.groups.params[layer][0]
        if previous == [layer]:  # trained last step too: its state is still there
            before = int(opt.optimizer.state[p]["step"])
            continues += 1
        else:  # newly drawn: dropped (or never created), so it starts from scratch
            assert p not in opt.optimizer.state
            before = 0
            restarts += 1
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        previous = [layer]
        if opt.active_layers == [layer]:
            assert int(opt.optimizer.state[p]["step"]) == before + 1
    assert restarts > 1 and continues >= 1


class Blocks(nn.Module):
    def __init__(self, num_layers=8, width=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(num_layers))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x).pow(2).mean()


@pytest.mark.parametrize("policy", ["offload", "drop"])
def test_thousand_steps_device_state_stays_at_the_active_layers_need(policy):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Blocks()
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=1, active_layers=2,
                       update_interval=50, state_policy=policy)
    per_layer = 2 * sum(p.numel() * 4 for p in model.layers[0].parameters())  # exp_avg(+_sq)
    head = 2 * sum(p.numel() * 4 for p in model.head.parameters())
    steps_bytes = 4 * (len(opt.groups.outside) + 2 * 2)  # one fp32 step scalar per param
    budget = 2 * per_layer + head + steps_bytes
    g = torch.Generator().manual_seed(0)
    peak = 0
    for _ in range(1000):
        model(torch.randn(4, 16, generator=g)).backward()
        opt.step()
        opt.zero_grad()
        peak = max(peak, opt.memory_report()["state_bytes_on_device"])
    assert peak <= budget, (peak, budget)
    report = opt.memory_report()
    if policy == "offload":
        assert report["state_bytes_offloaded"] == 6 * per_layer + 4 * 2 * 6
    else:
        assert report["state_bytes_offloaded"] == 0


def test_memory_report_fields():
    model, opt = _run("keep", lr=1e-2, steps=2)
    report = opt.memory_report()
    assert report["active_layers"] == opt.active_layers and report["state_policy"] == "keep"
    active_bytes = sum(p.numel() * p.element_size()
                       for p in opt.groups.layer_params(opt.active_layers))
    assert report["active_trainable_bytes"] == active_bytes
    assert report["state_bytes_on_device"] > 0 and report["state_bytes_offloaded"] == 0


def test_default_policy_is_keep_on_cpu():
    opt = ISTOptimizer(torch.optim.AdamW, lora_model(4), lr=1e-3)
    assert opt.state_policy == "keep"


def test_resume_with_offload_is_exact():
    full_model, full = _run("offload", steps=9, lr=1e-2)
    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, seed=4, update_interval=3,
                       state_policy="offload", lr=1e-2)
    for step in range(5):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    saved, weights = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    model2 = lora_model(6)
    model2.load_state_dict(weights)
    opt2 = ISTOptimizer(torch.optim.AdamW, model2, seed=4, update_interval=3,
                        state_policy="offload", lr=1e-2)
    opt2.load_state_dict(saved)
    assert {id(p) for p in opt2.optimizer.state} <= {
        id(p) for p in opt2.groups.layer_params(opt2.active_layers)}
    for step in range(5, 9):
        model2(**lm_batch(seed=step)).loss.backward()
        opt2.step()
        opt2.zero_grad()
    for (n, a), (_, b) in zip(full_model.named_parameters(), model2.named_parameters(),
                              strict=True):
        assert torch.equal(a, b), n


def test_paged_optimizers_default_to_keep_also_on_cuda():
    bnb = pytest.importorskip("bitsandbytes")
    cuda = torch.device("cuda")
    paged = bnb.optim.PagedAdamW8bit([nn.Parameter(torch.ones(4))])
    plain = bnb.optim.AdamW8bit([nn.Parameter(torch.ones(4))])
    assert resolve_state_policy(None, paged, cuda) == "keep"  # "offload" would refuse it
    assert resolve_state_policy(None, plain, cuda) == "offload"
    assert resolve_state_policy(None, plain, torch.device("cpu")) == "keep"


@pytest.mark.parametrize(
    ("policy", "sharded", "device", "expected"),
    [
        (None, True, "cuda", "keep"),  # FSDP2 on CUDA: no pinned plain copies
        ("drop", True, "cuda", "drop"),
        ("keep", True, "cuda", "keep"),
        (None, False, "cuda", "offload"),  # plain tensors: the device default
        ("offload", True, "cpu", "offload"),  # on the CPU offload moves nothing
        (None, True, "cpu", "keep"),
        ("drop", False, "cpu", "drop"),  # the user's choice is never overridden
    ],
)
def test_resolve_state_policy(policy, sharded, device, expected):
    adam = torch.optim.Adam([nn.Parameter(torch.ones(2))])
    assert resolve_state_policy(policy, adam, torch.device(device), sharded=sharded) == expected


def test_state_policy_offload_of_sharded_cuda_params_is_refused():
    adam = torch.optim.Adam([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="state_policy='offload' does not support FSDP2"):
        resolve_state_policy("offload", adam, torch.device("cuda"), sharded=True)


def test_paged_optimizers_refuse_offload_and_drop():
    bnb = pytest.importorskip("bitsandbytes")
    for policy in ("offload", "drop"):
        with pytest.raises(ValueError, match="paged optimizer"):
            ISTOptimizer(bnb.optim.PagedAdamW8bit, lora_model(4), lr=1e-3, state_policy=policy)
    ISTOptimizer(bnb.optim.PagedAdamW8bit, lora_model(4), lr=1e-3, state_policy="keep")


def test_bad_policy():
    with pytest.raises(ValueError, match="state_policy"):
        ISTOptimizer(torch.optim.AdamW, lora_model(4), lr=1e-3, state_policy="cpu")
    with pytest.raises(ValueError, match="state_policy"):
        StateResidency(torch.optim.SGD([nn.Parameter(torch.ones(1))]), "cpu")
