"""account_step: labelled peak of a real training step (plain AdamW, ISTOptimizer, CUDA)."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import lm_batch, lora_model, tiny_llama
from torch import nn

from ist_optim import ISTOptimizer, account_step
from ist_optim.memory import LiveMemory, PeakMemory

PARTS = {"weights", "gradients", "optimizer_state", "activations", "transient"}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _loop(model, opt, batch, held):
    def step():
        held["out"] = model(**batch)
        held["out"].loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def test_adamw_step_parts_are_exact():
    model = tiny_llama(num_layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    step = _loop(model, opt, lm_batch(vocab=64), {})
    step()
    account = account_step(step, model=model, optimizer=opt)
    assert set(account.breakdown) == PARTS
    assert account.peak_bytes == sum(account.breakdown.values())
    weights = _nbytes([*model.parameters(), *model.buffers()])
    assert account.breakdown["weights"] == weights
    state = [v for s in opt.state.values() for v in s.values()]
    assert account.breakdown["optimizer_state"] == _nbytes(state)
    assert account.breakdown["activations"] > 0
    assert account.host_optimizer_state_bytes == 0
    assert account.allocator_peak_bytes is None


def test_saved_activations_are_what_autograd_saves():
    """Wide activations, small weights: the peak (start of backward) holds the saved tensors."""
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        x = torch.ones(1024, 16)
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    account = account_step(step, model=model, optimizer=opt)
    relu_out, x_bytes = 4 * 1024 * 256, 4 * 1024 * 16
    # saved: x (first linear), the relu output (relu and second linear share it), the
    # output (square); the peak comes while the gradient of the relu output is computed,
    # after square's backward freed the output
    assert account.breakdown["activations"] == relu_out + x_bytes


def test_gradients_are_counted_when_they_peak_after_backward():
    """An optimizer step that allocates a large temporary: the peak holds every grad."""
    model = nn.Linear(512, 512, bias=False)

    class Heavy(torch.optim.SGD):
        def step(self, closure=None):
            scratch = torch.empty(4 * 512 * 512)  # 4 MiB temporary
            scratch.zero_()
            return super().step(closure)

    opt = Heavy(model.parameters(), lr=0.1)
    x = torch.ones(4, 512)

    def step():
        model(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    account = account_step(step, model=model, optimizer=opt)
    assert account.breakdown["gradients"] == 4 * 512 * 512
    assert account.breakdown["transient"] >= 16 * 512 * 512


def test_ist_optimizer_step_counts_only_the_active_layers_state():
    model = lora_model(num_layers=4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, active_layers=1, seed=0,
                       state_policy="drop", foreach=False)
    batch = lm_batch(vocab=64)
    step = _loop(model, opt, batch, {})
    step()
    before = opt.memory_report()["state_bytes_on_device"]
    account = account_step(step, model=model, optimizer=opt)
    # the peak (in the backward) holds the state the previous step left on the device
    assert account.breakdown["optimizer_state"] == before
    trainable_one_layer = opt.memory_report()["active_trainable_bytes"]
    assert account.breakdown["gradients"] <= trainable_one_layer
    assert account.host_optimizer_state_bytes == opt.memory_report()["state_bytes_offloaded"]


def test_bad_arguments():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="callable"):
        account_step(None, model=model, optimizer=opt)
    with pytest.raises(TypeError, match="nn.Module"):
        account_step(lambda: None, model=object(), optimizer=opt)


def test_peak_memory_on_the_cpu_sees_the_growth_since_its_reset():
    """The process's resident peak from the reset on: a 100 MB block shows in the growth,
    and a reset forgets it (clear_refs) where the kernel allows."""
    meter = PeakMemory("cpu")
    meter.reset()
    block = torch.ones(25_000_000)  # 100 MB
    block.add_(1)
    assert meter.growth_bytes() >= 75_000_000
    del block
    meter.reset()
    if meter.resettable:
        assert meter.growth_bytes() < 75_000_000
    assert meter.kind == ("peak RSS" if meter.resettable else "process peak RSS")


def test_live_memory_peak_and_labels():
    with LiveMemory("cpu") as live:
        a = torch.ones(1024)
        b = torch.ones(512)
        live.label(b, "kept")
        view = a[:10]  # a view is no new allocation
        del a, view
        c = torch.ones(256)
    assert live.peak_bytes == 4 * (1024 + 512)
    assert live.current_bytes == 4 * (512 + 256)
    assert live.label_of(b) == "kept" and live.label_of(c) is None
    assert live.peak_breakdown()["kept"] == 4 * 512


def _live_cuda_tensor_bytes() -> int:
    """Bytes of the storages of every CUDA tensor Python holds, as the caching allocator
    counts them (512-byte blocks)."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += -(-storage.nbytes() // 512) * 512
    return total


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["adamw", "ist"])
def test_cuda_account_agrees_with_max_memory_allocated(kind, record_property):
    """Tensors counted by the dispatch mode vs the caching allocator's own peak. The
    allocator also holds what no tensor owns: the cuBLAS workspaces of the forward's and
    the backward's threads (32 MiB each on Hopper), allocated at the first products and
    kept. Measured before the accounted step (allocated bytes less every live tensor's),
    they are the whole allowed difference, plus 1 MiB."""
    model = tiny_llama(num_layers=4, hidden=256, vocab=2048).cuda()
    if kind == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-4, active_layers=2, seed=0)
    batch = {k: v.cuda() for k, v in lm_batch(batch=8, seq=64, vocab=2048).items()}
    step = _loop(model, opt, batch, {})
    step()
    torch.cuda.synchronize()
    gc.collect()
    untracked = torch.cuda.memory_allocated() - _live_cuda_tensor_bytes()
    record_property("untracked_bytes", untracked)
    account = account_step(step, model=model, optimizer=opt)
    record_property("allocator_minus_account_bytes",
                    account.allocator_peak_bytes - account.peak_bytes)
    assert 0 <= untracked
    assert account.peak_bytes <= account.allocator_peak_bytes
    assert account.allocator_peak_bytes - account.peak_bytes <= untracked + 2**20, (
        account.allocator_peak_bytes, account.peak_bytes, untracked)
