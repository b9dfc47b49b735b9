"""Layer discovery and parameter-to-layer assignment."""

from __future__ import annotations

import pytest
import torch
from conftest import lora_model, tiny_llama
from peft import LoraConfig, get_peft_model

from ist_optim import build_layer_groups, discover_layers


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
