"""ISTOptimizer in a plain accelerate loop (CPU): prepare, accumulate, clip, save/load state."""

from __future__ import annotations

import pytest
import torch
from conftest import lora_model

from ist_optim import ISTOptimizer
from ist_optim.integrations import unwrap_ist_optimizer

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

IST_KWARGS = dict(lr=1e-2, seed=0, active_layers=1, update_interval=2, num_candidates=2)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def batches(n: int = 8, size: int = 2, seq: int = 8, vocab: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n * size, seq), generator=g)
    return [{"input_ids": ids[i:i + size], "labels": ids[i:i + size]}
            for i in range(0, n * size, size)]


def loader():
    data = [{"input_ids": b["input_ids"][j], "labels": b["labels"][j]}
            for b in batches() for j in range(2)]
    return torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)


def plain_loop(accumulation: int, max_norm: float):
    """The reference: no accelerate, gradient accumulation written out."""
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, **IST_KWARGS)
    for i, batch in enumerate(batches()):
        (model(**batch).loss / accumulation).backward()
        if (i + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            opt.zero_grad()
    return model, opt


def accelerate_loop(accumulation: int, max_norm: float, *, steps_limit: int | None = None,
                    accelerator: Accelerator | None = None, model=None, opt=None, skip: int = 0):
    accelerator = accelerator or Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = model or lora_model(4)
    opt = opt or ISTOptimizer(torch.optim.AdamW, model, **IST_KWARGS)
    model, opt, data = accelerator.prepare(model, opt, loader())
    for i, batch in enumerate(data):
        if i < skip:
            continue
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            opt.zero_grad()
        if steps_limit is not None and unwrap_ist_optimizer(opt).num_steps == steps_limit:
            break
    return accelerator, model, opt


def test_prepare_wraps_and_round_trips_the_ist_state():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, **IST_KWARGS)
    before = opt.state_dict()["ist"]["sampler"]
    accelerator = Accelerator(cpu=True)
    model, prepared = accelerator.prepare(model, opt)
    assert type(prepared).__name__ == "AcceleratedOptimizer"
    assert unwrap_ist_optimizer(prepared) is opt
    after = prepared.state_dict()["ist"]["sampler"]
    assert after["active_layers"] == before["active_layers"]
    assert torch.equal(after["generator_state"], before["generator_state"])
    assert prepared.param_groups is opt.param_groups


def test_accelerate_loop_equals_plain_loop_with_accumulation_and_clipping():
    ref_model, ref_opt = plain_loop(accumulation=2, max_norm=0.5)
    _, model, opt = accelerate_loop(accumulation=2, max_norm=0.5)
    ist = unwrap_ist_optimizer(opt)
    assert ist.num_steps == ref_opt.num_steps == 4
    for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert ist.active_layers == ref_opt.active_layers
    assert torch.equal(ist.scores, ref_opt.scores)


def test_save_state_and_load_state_resume_exactly(tmp_path):
    _, full_model, full_opt = accelerate_loop(accumulation=1, max_norm=1.0)

    accelerator, _, opt = accelerate_loop(accumulation=1, max_norm=1.0, steps_limit=3)
    accelerator.save_state(str(tmp_path / "state"))
    AcceleratorState._reset_state(True)

    accelerator = Accelerator(cpu=True)
    model = lora_model(4, seed=5)  # other weights: load_state must restore them
    fresh = ISTOptimizer(torch.optim.AdamW, model, **{**IST_KWARGS, "seed": 9})
    model, opt, _ = accelerator.prepare(model, fresh, loader())
    accelerator.load_state(str(tmp_path / "state"))
    assert fresh.num_steps == 3
    _, model, opt = accelerate_loop(accumulation=1, max_norm=1.0, accelerator=accelerator,
                                    model=model, opt=fresh, skip=3)
    for p, q in zip(full_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(unwrap_ist_optimizer(full_opt).scores, fresh.scores)
    assert unwrap_ist_optimizer(full_opt).active_layers == fresh.active_layers


@pytest.mark.cuda
def test_prepare_on_cuda_keeps_the_sampler_state_on_the_cpu():
    """accelerate (and the Trainer's map_location) move every state tensor to the device;
    the private torch.Generator only takes a CPU state."""
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model.cuda(), **IST_KWARGS)
    accelerator = Accelerator()
    model, prepared = accelerator.prepare(model, opt)
    assert opt.scores.device.type == "cpu"
    batch = {k: v.cuda() for k, v in batches()[0].items()}
    for _ in range(2):
        accelerator.backward(model(**batch).loss)
        prepared.step()
        prepared.zero_grad()
    assert opt.last_round is not None
