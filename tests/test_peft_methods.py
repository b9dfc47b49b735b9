"""IST with each PEFT method: layer assignment, training, and suppression semantics.

Suppression is defined the same way for every supported adapter: the adapter's change of
its module's output is multiplied by ``lambda``. So ``lambda = 0`` equals disabling the
layer's adapters, ``lambda = 1`` changes nothing, values in between interpolate linearly,
and leaving the context restores every value bit for bit.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from conftest import lm_batch, params_snapshot, tiny_llama
from torch import nn

from ist_optim import ISTOptimizer, Suppressor, find_tuner_layers

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _config(method: str):
    if method == "lora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    if method == "rslora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True,
                               init_lora_weights=False)
    if method == "dora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True,
                               init_lora_weights=False)
    if method == "adalora":
        return peft.AdaLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, total_step=10,
                                  init_lora_weights=False)
    if method == "ia3":
        return peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"],
                              init_ia3_weights=False)
    if method == "loha":
        return peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False)
    if method == "lokr":
        return peft.LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False)
    raise AssertionError(method)


METHODS = ["lora", "rslora", "dora", "adalora", "ia3", "loha", "lokr"]


def method_kwargs(method: str) -> dict:
    """AdaLoRA's rank allocator needs every adapter's gradient: freeze_inactive=False."""
    return {"freeze_inactive": False} if method == "adalora" else {}


def build(method: str, config=None, seed: int = 0):
    base = tiny_llama(4, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        model = peft.get_peft_model(base, config or _config(method))
        if method == "dora":
            # Move the magnitudes away from ||W + sBA|| so that "DoRA with lambda = 0"
            # differs from "adapter off" unless the whole DoRA change is damped.
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.data.mul_(1.0 + 0.1 * torch.rand_like(p))
        if method == "ia3":
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.data.add_(0.3 * torch.randn_like(p))
    return model


def blocks_of(model) -> list[nn.Module]:
    return list(model.base_model.model.model.layers)


@contextlib.contextmanager
def adapters_disabled(block: nn.Module):
    """The reference: peft's own switch that makes a tuner layer return its base output."""
    tuners = find_tuner_layers(block)
    for module in tuners:
        module._disable_adapters = True
    try:
        yield
    finally:
        for module in tuners:
            module._disable_adapters = False


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("method", METHODS)
def test_layer_assignment(method):
    model = build(method)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0, **method_kwargs(method))
    assert opt.num_layers == 4
    assert opt.groups.outside == []
    for i, params in enumerate(opt.groups.params):
        expected = {id(p) for n, p in trainable if f".layers.{i}." in n}
        assert {id(p) for p in params} == expected and expected


@pytest.mark.parametrize("method", METHODS)
def test_suppression_zero_equals_adapters_off_and_one_is_identity(method):
    model = build(method).eval()
    batch = lm_batch()
    blocks = blocks_of(model)
    full = logits(model, batch)
    for layer in (0, 2):
        with adapters_disabled(blocks[layer]):
            off = logits(model, batch)
        assert not torch.allclose(off, full), "the adapters must change the output"
        with Suppressor(blocks, factor=0.0).suppress([layer]):
            zero = logits(model, batch)
        torch.testing.assert_close(zero, off, rtol=0, atol=1e-6)
        with Suppressor(blocks, factor=1.0).suppress([layer]):
            one = logits(model, batch)
        torch.testing.assert_close(one, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_suppression_scales_each_adapter_change_linearly(method):
    model = build(method).eval()
    tuners = find_tuner_layers(blocks_of(model)[1])
    assert tuners
    g = torch.Generator().manual_seed(0)
    for module in tuners:
        x = torch.randn(3, module.get_base_layer().in_features, generator=g)
        with torch.no_grad():
            adapted = module(x)
            base = module.get_base_layer()(x)
            with Suppressor([module], factor=0.25, mode="adapters").suppress([0]):
                damped = module(x)
        torch.testing.assert_close(damped, base + 0.25 * (adapted - base), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_suppression_restores_bit_exactly_also_on_error(method):
    model = build(method).eval()
    blocks = blocks_of(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scalings = [dict(m.scaling) for m in find_tuner_layers(model) if hasattr(m, "scaling")]
    full = logits(model, lm_batch())
    suppressor = Suppressor(blocks, factor=0.25)
    with pytest.raises(RuntimeError, match="boom"), suppressor.suppress([0, 1, 3]):
        logits(model, lm_batch())
        raise RuntimeError("boom")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert scalings == [dict(m.scaling) for m in find_tuner_layers(model) if hasattr(m, "scaling")]
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(logits(model, lm_batch()), full)


@pytest.mark.parametrize("method", METHODS)
def test_training_updates_only_active_layers_and_runs_rounds(method):
    model = build(method)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=1,
                       update_interval=2, num_candidates=2, **method_kwargs(method))
    for step in range(4):
        active = opt.active_layers
        before = params_snapshot(model)
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        ids = {id(p) for i in active for p in opt.groups.params[i]}
        for name, p in model.named_parameters():
            if not any(p is q for ps in opt.groups.params for q in ps):
                assert torch.equal(before[name], p), name
            elif id(p) in ids:
                continue
            else:
                assert torch.equal(before[name], p), f"inactive {name} changed at step {step}"
        changed = [n for n, p in model.named_parameters()
                   if id(p) in ids and not torch.equal(before[n], p)]
        assert changed, f"no parameter of the active layers {active} changed"
    assert opt.last_round is not None and opt.last_round["step"] == 4
    assert torch.count_nonzero(opt.importance) > 0


def test_modules_to_save_train_every_step_in_the_outside_group():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                             modules_to_save=["lm_head"])
    model = build("lora", config)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=1,
                       update_interval=2)
    outside = {id(p) for p in opt.groups.outside}
    names = [n for n, p in model.named_parameters() if id(p) in outside]
    assert names and all("modules_to_save" in n for n in names)
    for step in range(3):
        before = [p.detach().clone() for p in opt.groups.outside]
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        assert all(not torch.equal(b, p) for b, p in zip(before, opt.groups.outside, strict=True))


def test_modules_to_save_inside_a_block_join_that_layer():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                             modules_to_save=["post_attention_layernorm"])
    model = build("lora", config)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    for i, params in enumerate(opt.groups.params):
        names = {n for n, p in model.named_parameters() if any(p is q for q in params)}
        assert any(f"layers.{i}.post_attention_layernorm.modules_to_save" in n for n in names)
    assert opt.groups.outside == []


def test_vera_is_refused_naming_the_adapter_type():
    model = build("vera", peft.VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"adapter type 'vera' \(peft\.tuners\.vera"):
        ISTOptimizer(torch.optim.AdamW, model, lr=1e-3)
    # Layer sampling alone needs no suppression rule.
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, sampling="uniform", seed=0)
    assert opt.num_layers == 4


def test_prompt_tuning_is_refused_naming_the_method():
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = build("prompt", config)
    with pytest.raises(ValueError, match="PROMPT_TUNING"):
        ISTOptimizer(torch.optim.AdamW, model, lr=1e-3)


class _EmbeddingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, ids):
        return self.proj(self.emb(ids))


def test_unsupported_lora_variant_is_refused_naming_it():
    variants = pytest.importorskip("peft.tuners.lora.variants")
    if not hasattr(variants, "MiCALinearVariant"):
        pytest.skip(f"peft {peft.__version__} has no MiCA LoRA variant to refuse")
    mica = build("mica", peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica"))
    with pytest.raises(ValueError, match="LoRA variant MiCALinearVariant of adapter 'default'"):
        ISTOptimizer(torch.optim.AdamW, mica, lr=1e-3)


def test_unsupported_dora_embedding_is_refused_naming_it():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.ModuleList(_EmbeddingBlock() for _ in range(2)))
        model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["emb"],
                                                         use_dora=True))
    with pytest.raises(ValueError, match=re.escape("LoRA variant DoraEmbedding")):
        ISTOptimizer(torch.optim.AdamW, model, lr=1e-3)


def test_full_fine_tuning_uses_residual_suppression():
    model = tiny_llama(4).eval()
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0, active_layers=1,
                       update_interval=2)
    assert opt.rounds.suppressor.mode == "residual"
    names = [n for n, p in model.named_parameters() if any(p is q for q in opt.groups.outside)]
    assert sorted(names) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    batch = lm_batch()
    block = model.model.layers[2]

    def skip(_mod, args, kwargs, _out):
        return args[0] if args else kwargs["hidden_states"]

    handle = block.register_forward_hook(skip, with_kwargs=True)
    skipped = logits(model, batch)
    handle.remove()
    with opt.rounds.suppressor.suppress([2]), torch.no_grad():
        damped = logits(model, batch)
    full = logits(model, batch)
    sup0 = Suppressor(list(model.model.layers), factor=0.0)
    with sup0.suppress([2]):
        zero = logits(model, batch)
    assert torch.equal(zero, skipped)
    assert not torch.allclose(damped, full) and not torch.allclose(damped, skipped)
    model.train()
    for step in range(2):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.last_round is not None and torch.count_nonzero(opt.importance) > 0


# 5. AdaLoRA: the loop peft documents works (freeze_inactive=False), else refused ----------
def _adalora(total_step=12):
    from peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(r=4, init_r=4, target_r=2, lora_alpha=8, tinit=2, tfinal=2,
                           deltaT=2, total_step=total_step,
                           target_modules=["q_proj", "v_proj"])
    with torch.random.fork_rng():
        torch.manual_seed(1)
        return get_peft_model(tiny_llama(4), config)


def test_adalora_is_refused_with_frozen_inactive_layers():
    with pytest.raises(ValueError, match="freeze_inactive=False"):
        ISTOptimizer(torch.optim.AdamW, _adalora(), lr=1e-3)


def test_adalora_documented_loop_runs_and_allocates_ranks():
    model = _adalora()
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=2,
                       update_interval=3, freeze_inactive=False)
    rank_patterns = []
    for step in range(12):
        before = params_snapshot(model)
        active = opt.active_layers
        loss = model(**lm_batch(seed=step)).loss
        loss.backward()
        opt.step()
        changed = {i for i, name in enumerate(opt.layer_names)
                   if any(not torch.equal(before[n], p) for n, p in model.named_parameters()
                          if n.startswith(name + ".") and "lora_" in n)}
        assert changed == set(active)  # the update trained the active layers only
        model.base_model.update_and_allocate(step)   # peft's documented AdaLoRA loop
        opt.zero_grad()
        rank_patterns.append(model.peft_config["default"].rank_pattern)
    assert rank_patterns[-1] is not None  # the allocator masked ranks to its budget
