"""Reproductions of the defects a code review found (issue 10), one or more tests each.

Each test fails on the code before the split of ``ISTOptimizer`` into its concepts
(commit 53233cf) and passes now.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from conftest import lm_batch, lora_model, params_snapshot, tiny_llama, train_steps
from torch import nn

import ist_optim.rounds as rounds_module
from ist_optim import ISTOptimizer
from ist_optim.dist_checkpoint import get_optimizer_state_dict, set_optimizer_state_dict

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


# 3. params are read from the inner optimizer's normalised param_groups ------------------
def test_param_group_holding_a_single_tensor_stays_in_its_layer():
    blocks = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(4))
    model = nn.Sequential(*blocks)
    groups = [{"params": block.weight} for block in blocks]
    opt = ISTOptimizer(torch.optim.SGD, model, params=groups, lr=0.1, layers=list(blocks),
                       active_layers=1, seed=0)
    assert opt.layer_groups.outside == []
    assert [len(ps) for ps in opt.layer_groups.params] == [1, 1, 1, 1]
    before = params_snapshot(model)
    model(torch.randn(2, 4)).pow(2).sum().backward()
    active = opt.active_layers
    opt.step()
    changed = [i for i in range(4) if not torch.equal(before[f"{i}.weight"], blocks[i].weight)]
    assert changed == active


def test_named_parameters_are_accepted():
    model = lora_model(4)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = ISTOptimizer(torch.optim.AdamW, model, params=named, lr=1e-2, seed=0)
    plain = ISTOptimizer(torch.optim.AdamW, lora_model(4), lr=1e-2, seed=0)
    assert opt.layer_groups.numels() == plain.layer_groups.numels()
    assert opt.param_groups[0]["param_names"] == [n for n, _ in named]
    _train(model, opt, 2)


# 4. discovery counts trainable parameters and takes every stack -------------------------
def _seeded(build):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build()


def test_encoder_decoder_gets_encoder_and_decoder_blocks():
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base = _seeded(lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=40, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0)))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q", "v"]))
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0)
    names = [n.split("base_model.model.", 1)[1] for n in opt.layer_names]
    assert names == [f"encoder.block.{i}" for i in range(2)] + \
        [f"decoder.block.{i}" for i in range(3)]
    assert opt.layer_groups.outside == []
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def test_bart_gets_encoder_and_decoder_layers():
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base = _seeded(lambda: tf.BartForConditionalGeneration(tf.BartConfig(
        vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=32)))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0)
    assert [n.rsplit(".", 2)[-2] for n in opt.layer_names] == ["layers"] * 4
    assert ["encoder" in n for n in opt.layer_names] == [True, True, False, False]


def test_vision_language_model_picks_the_stack_with_adapters():
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    vision = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                 num_attention_heads=2, image_size=16, patch_size=8)
    text = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1)
    config = tf.LlavaConfig(vision_config=vision.to_dict(), text_config=text,
                            image_token_index=63)
    base = _seeded(lambda: tf.LlavaForConditionalGeneration(config))
    # LoRA on the language model only (the vision tower holds more, frozen, parameters)
    model = get_peft_model(base, LoraConfig(
        r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0)
    assert opt.num_layers == 3
    assert all("language_model" in n for n in opt.layer_names)


def test_large_outside_group_warns_once():
    model = lora_model(4, modules_to_save=["lm_head", "embed_tokens"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0)
    messages = [str(w.message) for w in caught if "no discovered layer" in str(w.message)]
    assert len(messages) == 1 and "lm_head" in messages[0]


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


# 6. the torch optimizer contract ---------------------------------------------------------
def test_pickle_and_deepcopy_round_trip():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, update_interval=2)
    _train(model, opt, 3)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.active_layers == opt.active_layers
        assert torch.equal(clone.scores, opt.scores)
        assert clone.num_steps == 3
        _train(clone.model, clone, 2, start=3)  # the copy trains its own model
    _train(model, opt, 2, start=3)
    twin = copy.deepcopy(opt)
    assert twin.state_dict()["ist"]["sampler"]["num_steps"] == 5


def test_state_dict_hooks_registered_on_the_wrapper_run():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("save-post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert calls == ["save-pre", "save-post", "load-pre", "load-post"]


def test_global_step_hooks_fire_once_per_step():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    seen = []
    handle = register_optimizer_step_pre_hook(lambda o, args, kwargs: seen.append(o))
    mine = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("own"))
    try:
        _train(model, opt, 2)
    finally:
        handle.remove()
        mine.remove()
    assert seen == [opt, "own", opt, "own"]


def test_lbfgs_gets_the_closure_and_trains():
    with torch.random.fork_rng():  # the init must not depend on the tests run before
        torch.manual_seed(0)
        blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
    model = nn.Sequential(*blocks)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    opt = ISTOptimizer(torch.optim.LBFGS, model, layers=list(blocks), active_layers=2,
                       sampling="uniform", seed=0, lr=0.5, max_iter=5)
    losses = []

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    before = params_snapshot(model)
    active = opt.active_layers
    losses.append(float(opt.step(closure)))
    changed = [i for i in range(4) if not torch.equal(before[f"{i}.weight"], blocks[i].weight)]
    assert changed == active  # no curvature history yet: only the active layers move
    for _ in range(3):
        losses.append(float(opt.step(closure)))
    assert float(closure()) < losses[0]


def test_closure_with_freeze_inactive_false_keeps_inactive_layers_fixed():
    blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
    model = nn.Sequential(*blocks)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    opt = ISTOptimizer(torch.optim.SGD, model, layers=list(blocks), active_layers=1,
                       sampling="uniform", seed=0, lr=0.1, freeze_inactive=False)
    before = params_snapshot(model)
    active = opt.active_layers

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    changed = [i for i in range(4) if not torch.equal(before[f"{i}.weight"], blocks[i].weight)]
    assert changed == active
    assert all(b.weight.grad is not None for b in blocks)  # inactive grads kept, not updated


# 7. the first-order round's collective runs on every rank, before any skip ---------------
def test_first_order_round_reduces_before_deciding_to_skip(monkeypatch):
    calls = []

    def recording_average(values, group):
        calls.append(values.clone())
        return values.detach().to(torch.float64).cpu()

    monkeypatch.setattr(rounds_module, "average_across_ranks", recording_average)
    blocks = nn.ModuleList(nn.Linear(3, 3) for _ in range(4))
    model = nn.Sequential(*blocks)
    opt = ISTOptimizer(torch.optim.SGD, model, layers=list(blocks), active_layers=1,
                       estimator="first-order", update_interval=1, seed=0, lr=0.1)
    x = torch.randn(2, 3)
    # only the top layer active and reached: one layer, no update, but the collective ran
    opt.set_active_layers([3])
    model(x).pow(2).sum().backward()
    opt.step()
    assert len(calls) == 1 and calls[0].numel() == 2 * 4  # per-layer sums and counts
    assert opt.last_round is None


# 8. clear errors for bad input ----------------------------------------------------------
def test_loss_fn_returning_a_non_scalar_names_the_fix():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=1e-3, seed=0, update_interval=1,
                       loss_fn=lambda m, b: torch.ones(4))
    model(**lm_batch()).loss.backward()
    with pytest.raises(ValueError, match=r"loss_fn returned a tensor of shape \(4,\).*mean"):
        opt.step()


def test_loss_fn_returning_a_non_number_names_the_fix():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=1e-3, seed=0, update_interval=1,
                       loss_fn=lambda m, b: "loss")
    model(**lm_batch()).loss.backward()
    with pytest.raises(TypeError, match="loss_fn returned a str"):
        opt.step()


def test_empty_importance_batches_refused_at_construction():
    with pytest.raises(ValueError, match="importance_batches is empty"):
        ISTOptimizer(torch.optim.SGD, lora_model(4), lr=1e-3, importance_batches=[])


@pytest.mark.parametrize("name", ["score_lr", "suppression", "score_retention"])
def test_nan_option_is_a_value_error_naming_the_range(name):
    with pytest.raises(ValueError, match=rf"Invalid {name}: nan; expected a number in"):
        ISTOptimizer(torch.optim.SGD, lora_model(4), lr=1e-3, **{name: float("nan")})


# 9. cost: the backward cut walks the graph once per forward, not once per block ----------
def test_graph_walks_grow_linearly_with_depth_when_embeddings_train():
    def walked(num_layers):
        model = lora_model(num_layers, modules_to_save=["embed_tokens"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the outside group is large here
            opt = ISTOptimizer(torch.optim.SGD, model, lr=1e-3, seed=0,
                               sampling="uniform", active_layers=1)
        opt.set_active_layers([num_layers - 1])  # the cut acts up to the top block
        model(**lm_batch()).loss.backward()
        cut = opt.activator.backward_cut
        assert cut is not None and cut.cuts == 0  # embeddings train: nothing may be cut
        return cut.nodes_walked

    small, large = walked(4), walked(16)
    # linear: 4x the blocks, about 4x the nodes; re-walking per block would be ~16x
    assert large <= 5 * small
