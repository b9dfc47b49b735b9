"""The order of the offload's stream calls, on every CI run: ``StateResidency`` and
``ISTOptimizer`` driven through :class:`fake_streams.FakeStreams`, which delivers a copy
only once the code waited for it (see that module). The same order on a real GPU:
tests/test_cuda.py."""

from __future__ import annotations

import copy

import pytest
import torch
from fake_streams import FakeStreams
from test_residency import Blocks

import ist_optim.memory.residency as residency_module
from ist_optim import ISTOptimizer, StateResidency
from ist_optim.memory.streams import CudaStreams


def _model() -> Blocks:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Blocks(num_layers=8, width=16)


def _inputs(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 16, generator=g) for _ in range(steps)]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _state_tensors(optimizer) -> dict[int, torch.Tensor]:
    return {id(v): v for entry in optimizer.state.values() for v in entry.values()
            if isinstance(v, torch.Tensor)}


def _train(model, policy, steps, monkeypatch=None, check=None, **kwargs):
    """``steps`` steps of 2 of 8 blocks; with ``monkeypatch``, the offload runs through a
    FakeStreams (returned); ``check(opt, fake, before)`` runs after every step."""
    fake = None
    if monkeypatch is not None:
        fake = FakeStreams()
        monkeypatch.setattr(residency_module, "CudaStreams", lambda: fake)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=3, active_layers=2,
                       sampling="uniform", state_policy=policy, **kwargs)
    if fake is not None:
        fake.watch(opt.optimizer)
    sets = []
    for x in _inputs(steps):
        sets.append(opt.active_layers)
        model(x).backward()
        before = _state_tensors(opt.optimizer)
        opt.step()
        opt.zero_grad()
        if check is not None:
            check(opt, fake, before)
    return opt, fake, sets


def test_the_residency_takes_the_real_cuda_calls_by_default():
    res = StateResidency(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), "offload")
    assert isinstance(res.streams, CudaStreams)
    assert not res.streams.handles(torch.ones(1))  # host tensors: no streams at all


def test_offload_through_delayed_copies_is_bit_identical_to_keep(monkeypatch):
    """The update waits for the copy back and a copy out waits for the update: otherwise
    the fake delivers poison (NaN) into the state and the runs differ."""
    keep_model, off_model = _model(), _model()
    keep, _, keep_sets = _train(keep_model, "keep", 30)
    off, fake, off_sets = _train(off_model, "offload", 30, monkeypatch)
    assert keep_sets == off_sets and len({tuple(s) for s in off_sets}) > 5
    assert fake.copies > 50  # the CUDA path ran: copies out and back through the fake
    assert fake.stale_copies == 0 and fake.raced_updates == 0
    for (n, a), (_, b) in zip(keep_model.named_parameters(), off_model.named_parameters(),
                              strict=True):
        assert torch.equal(a, b), n
    assert _same(keep.state_dict()["state"], off.state_dict()["state"])


def test_a_buffer_is_not_reused_while_a_copy_is_in_flight(monkeypatch):
    """Each state tensor a switch takes out of the optimizer is recorded on the side
    stream that copies it out; each buffer a copy back fills on the side stream is
    recorded on the current stream, which uses it next."""
    seen = {"out": 0}

    def check(opt, fake, before):
        after = _state_tensors(opt.optimizer)
        removed = [t for key, t in before.items() if key not in after]
        seen["out"] += len(removed)
        assert not fake.unrecorded(removed, "side0")

    _, fake, _ = _train(_model(), "offload", 12, monkeypatch, check=check)
    back = [t for t, stream in fake.allocated_on.values() if stream == "side0"]
    assert seen["out"] > 0 and back
    assert not fake.unrecorded(back, "current")


def _trained_residency(fake):
    """A residency over 2 parameters with one AdamW step of state each."""
    params = [torch.nn.Parameter(torch.randn(8, generator=torch.Generator().manual_seed(i)))
              for i in range(2)]
    inner = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    inner.step()
    fake.watch(inner)
    return params, inner, StateResidency(inner, "offload", streams=fake)


def test_a_save_after_the_update_waited_waits_for_the_copy_out():
    """No switch after the wait (the same set drawn again, dense steps): the host's read
    of the copies out still waits for them."""
    fake = FakeStreams()
    (p, q), inner, res = _trained_residency(fake)
    saved = copy.deepcopy(inner.state[p])
    res.deactivate([p])  # copy out in flight
    p.grad = None  # inactive now
    res.wait()  # the next step's update waits for it ...
    inner.step()  # ... and runs (q only)
    offloaded = res.offloaded_state()  # a checkpoint reads the host copy
    assert _same(offloaded[p], saved)
    assert ("synchronize", "side0", 1) in fake.log


def test_the_copy_back_reads_what_the_copy_out_still_writes():
    """Out and back before either arrived: the side stream runs them in order."""
    fake = FakeStreams()
    (p, _q), inner, res = _trained_residency(fake)
    saved = copy.deepcopy(inner.state[p])
    res.deactivate([p])
    res.activate([p])
    res.wait()
    fake.before_update()  # the current stream's next work
    assert _same(inner.state[p], saved) and fake.raced_updates == 0


def test_without_the_wait_the_update_reads_a_copy_in_flight():
    """The fake itself: an update that did not wait sees the poison (what the offload
    tests above rely on to fail)."""
    fake = FakeStreams()
    (p, _q), inner, res = _trained_residency(fake)
    res.deactivate([p])
    res.synchronize()
    res.activate([p])
    fake.before_update()  # no res.wait() first
    assert fake.raced_updates == 1
    assert torch.isnan(inner.state[p]["exp_avg"]).all()


@pytest.mark.parametrize("reader", ["state_dict", "memory_report"])
def test_readers_of_the_host_copies_synchronize_first(monkeypatch, reader):
    opt, fake, _ = _train(_model(), "offload", 6, monkeypatch)
    fake.log.clear()
    getattr(opt, reader)()
    assert [e for e in fake.log if e[0] == "synchronize"]
    assert not [c for c in fake.in_flight if c.into_host]
