"""Layer discovery and parameter-to-layer assignment."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import lora_model, params_snapshot, tiny_llama, train_steps
from peft import LoraConfig, get_peft_model
from torch import nn

from ist_optim import ISTOptimizer, build_layer_groups, discover_layers


def _tiny(kind: str):
    import transformers as tf

    small = dict(num_attention_heads=2, vocab_size=50)
    builders = {
        "llama": lambda: tiny_llama(3),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
            hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_key_value_heads=1,
            **small)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_key_value_heads=1,
            **small)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=3, n_head=2,
                                                          vocab_size=50)),
        "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=3, **small)),
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return builders[kind]()


EXPECTED = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers",
            "gpt2": "transformer.h", "bert": "bert.encoder.layer"}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_discovers_block_list_of_hf_models(kind):
    model = _tiny(kind)
    found = discover_layers(model)
    assert [n for n, _ in found] == [f"{EXPECTED[kind]}.{i}" for i in range(3)]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_discovers_through_peft_wrapping(kind):
    targets = {"llama": ["q_proj"], "gpt2": ["c_attn"], "bert": ["query"]}[kind]
    model = get_peft_model(_tiny(kind), LoraConfig(r=2, target_modules=targets))
    names = [n for n, _ in discover_layers(model)]
    assert names == [f"base_model.model.{EXPECTED[kind]}.{i}" for i in range(3)]


def test_lora_params_assigned_to_their_layer_and_rest_outside():
    model = lora_model(4, modules_to_save=["lm_head"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = build_layer_groups(model, trainable)
    assert groups.num_layers == 4
    names = {id(p): n for n, p in model.named_parameters()}
    for i, params in enumerate(groups.params):
        assert params and all(f"layers.{i}." in names[id(p)] for p in params)
        assert all("lora_" in names[id(p)] for p in params)
    assert groups.outside and all("lm_head" in names[id(p)] for p in groups.outside)
    assert sum(len(ps) for ps in groups.params) + len(groups.outside) == len(trainable)


def test_blocks_without_trainable_params_are_left_out():
    model = lora_model(4, layers_to_transform=[1, 3])
    groups = build_layer_groups(model, [p for p in model.parameters() if p.requires_grad])
    assert groups.names == ["base_model.model.model.layers.1", "base_model.model.model.layers.3"]


def test_explicit_list_name_and_regex():
    model = tiny_llama(3)
    blocks = list(model.model.layers)
    by_list = discover_layers(model, blocks)
    by_name = discover_layers(model, "model.layers")
    by_regex = discover_layers(model, r"model\.layers\.\d+")
    assert [m for _, m in by_list] == [m for _, m in by_name] == [m for _, m in by_regex] == blocks


def test_custom_model_without_module_list_needs_layers():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layers="):
        discover_layers(model)
    found = discover_layers(model, [model[0], model[2]])
    assert [n for n, _ in found] == ["0", "2"]


def test_bad_layer_specs():
    model = tiny_llama(2)
    with pytest.raises(ValueError, match="fully matches no module"):
        discover_layers(model, "nope")
    with pytest.raises(ValueError, match="not a submodule"):
        discover_layers(model, [torch.nn.Linear(1, 1)])
    with pytest.raises(TypeError, match="wrap it in a list"):
        discover_layers(model, model.model.layers[0])
    with pytest.raises(TypeError, match=r"layers\[0\]"):
        discover_layers(model, ["model.layers.0"])


def test_no_trainable_param_in_any_block():
    model = tiny_llama(2)
    with pytest.raises(ValueError, match="holds a trainable parameter"):
        build_layer_groups(model, [model.lm_head.weight])


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
    train_steps(model, opt, 2)


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
