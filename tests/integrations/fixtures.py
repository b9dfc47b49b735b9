"""Build the local inputs of the axolotl and LLaMA-Factory end-to-end tests (a tiny random
Llama with its own word-level tokenizer, an alpaca-format JSONL dataset; nothing is
downloaded), and read what a run wrote (checkpoint weights, logs, changed blocks)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

_LAYER = re.compile(r"\.layers\.(\d+)\.")

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


# ---------------------------------------------------------------- reading what a run wrote
def train_logs(checkpoint: Path) -> dict[int, dict[str, Any]]:
    """The training log entries of ``checkpoint``'s ``trainer_state.json``, by step."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def active_layers(log: dict[str, Any], num_layers: int) -> set[int]:
    """The layers a log entry's ``ist/active_layer_*`` keys mark as trained."""
    return {i for i in range(num_layers) if log[f"ist/active_layer_{i}"] == 1.0}


def changed_layers(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[int]:
    """Indices of the blocks with a tensor that differs; -1 for tensors outside the blocks."""
    changed = set()
    for name, tensor in after.items():
        if not torch.equal(tensor, before[name]):
            match = _LAYER.search(name)
            changed.add(int(match.group(1)) if match else -1)
    return changed


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The adapter's (or the model's) weights saved in ``checkpoint``."""
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (checkpoint / name).exists():
            return load_file(str(checkpoint / name))
    raise FileNotFoundError(f"no weights in {checkpoint}")


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
