"""Build the local inputs of the axolotl end-to-end tests: a tiny random Llama with its own
word-level tokenizer, and an alpaca-format JSONL dataset. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

_WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing "
          "above green hills and one old river runs to the sea under bright stars").split()


def write_dataset(path: Path, rows: int = 64) -> Path:
    """``rows`` alpaca records (instruction, input, output) made of ``_WORDS``, fixed order."""
    generator = torch.Generator().manual_seed(1234)
    with path.open("w", encoding="utf-8") as file:
        for _ in range(rows):
            picks = torch.randint(len(_WORDS), (18,), generator=generator).tolist()
            words = [_WORDS[i] for i in picks]
            record = {"instruction": "repeat " + " ".join(words[:4]), "input": " ".join(words[4:8]),
                      "output": " ".join(words[8:])}
            file.write(json.dumps(record) + "\n")
    return path


def write_tiny_llama(directory: Path, *, layers: int = 4, hidden: int = 64,
                     extra_specials: tuple[str, ...] = (), max_positions: int = 256) -> Path:
    """Save a random-init LlamaForCausalLM (fp32) and a word-level fast tokenizer;
    ``extra_specials``: more special tokens in its vocabulary (a config's ``pad_token``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra_specials]
    # the alpaca prompt's own words, then the data's; anything else maps to <unk>
    prompt = ("Below is an instruction that describes a task paired with an input that "
              "provides further context Write a response appropriately completes the request "
              "### Instruction Input Response : repeat").split()
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + prompt + list(_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                        additional_special_tokens=list(extra_specials))
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, tie_word_embeddings=False)
    with torch.device("meta"):  # no draw from the global RNG: weights come from our generator
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(directory, safe_serialization=True)  # buffers are rebuilt on load
    return directory
