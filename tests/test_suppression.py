"""Suppression damps exactly the chosen layers and restores the model bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, lora_model, params_snapshot, tiny_llama

from ist_optim import Suppressor
from ist_optim.importance.suppression import find_tuner_layers


def _blocks(model):
    return list(model.base_model.model.model.layers)


def _loss(model, batch):
    with torch.no_grad():
        return model(**batch).loss


def test_attention_scaling_is_not_touched():
    model = lora_model(2)
    attn = model.base_model.model.model.layers[0].self_attn
    before = attn.scaling
    sup = Suppressor(_blocks(model), 0.25)
    seen = []
    with sup.suppress([0, 1]):
        seen.append(attn.scaling)
    assert seen == [before] and attn.scaling == before
    assert all(type(m).__name__ == "Linear" for m in find_tuner_layers(_blocks(model)[0]))


def test_lora_scaling_damped_and_restored():
    model = lora_model(2)
    tuners = find_tuner_layers(_blocks(model)[1])
    before = [dict(m.scaling) for m in tuners]
    with Suppressor(_blocks(model), 0.25).suppress([1]):
        assert [m.scaling["default"] for m in tuners] == [b["default"] * 0.25 for b in before]
    assert [dict(m.scaling) for m in tuners] == before


def test_factor_zero_equals_disabling_that_layers_adapters():
    model = lora_model(3)
    batch = lm_batch()
    with Suppressor(_blocks(model), 0.0).suppress([1]):
        damped = _loss(model, batch)
    for m in find_tuner_layers(_blocks(model)[1]):
        m.scaling["default"] = 0.0
    assert torch.equal(damped, _loss(model, batch))


def test_factor_one_changes_nothing_and_suppression_changes_loss():
    model = lora_model(3)
    batch = lm_batch()
    base = _loss(model, batch)
    with Suppressor(_blocks(model), 1.0).suppress([0, 1, 2]):
        assert torch.equal(_loss(model, batch), base)
    with Suppressor(_blocks(model), 0.25).suppress([0]):
        assert not torch.equal(_loss(model, batch), base)
    assert torch.equal(_loss(model, batch), base)


def test_restored_when_forward_raises():
    model = lora_model(2)
    snapshot = params_snapshot(model)
    scalings = [dict(m.scaling) for b in _blocks(model) for m in find_tuner_layers(b)]
    sup = Suppressor(_blocks(model), 0.25)
    with pytest.raises(RuntimeError, match="boom"), sup.suppress([0, 1]):
        raise RuntimeError("boom")
    assert scalings == [dict(m.scaling) for b in _blocks(model) for m in find_tuner_layers(b)]
    after = params_snapshot(model)
    assert all(torch.equal(snapshot[n], after[n]) for n in snapshot)


def test_residual_mode_for_full_finetuning():
    model = tiny_llama(3)
    blocks = list(model.model.layers)
    sup = Suppressor(blocks, 0.5)
    assert sup.mode == "residual"
    batch = lm_batch()
    base = _loss(model, batch)

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    seen: dict[str, torch.Tensor] = {}
    hooks = [
        blocks[1].register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("in", (a[0] if a else k["hidden_states"]).clone()),
            with_kwargs=True),
        blocks[1].register_forward_hook(lambda m, a, o: seen.__setitem__("raw", first(o).clone())),
        blocks[2].register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("next", (a[0] if a else k["hidden_states"]).clone()),
            with_kwargs=True),
    ]
    with sup.suppress([1]):
        damped = _loss(model, batch)
    for h in hooks:
        h.remove()
    expected = seen["in"] + 0.5 * (seen["raw"] - seen["in"])
    assert torch.allclose(seen["next"], expected, atol=1e-6)
    assert not torch.equal(damped, base)
    assert torch.equal(_loss(model, batch), base)  # the damping hooks are gone


def test_adapters_mode_needs_adapters():
    with pytest.raises(ValueError, match="needs peft tuner layers"):
        Suppressor(list(tiny_llama(2).model.layers), 0.25, mode="adapters")
    with pytest.raises(ValueError, match="suppression mode"):
        Suppressor([], 0.25, mode="bogus")  # type: ignore[arg-type]
