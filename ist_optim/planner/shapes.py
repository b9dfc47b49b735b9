"""Named model shapes for planning (configs only: nothing is downloaded or allocated)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SHAPES", "load_config"]

#: Config fields of well-known checkpoints (from their published ``config.json``).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-2-7b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                   "intermediate_size": 11008, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32,
                   "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256,
                   "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                   "rope_theta": 500000.0, "tie_word_embeddings": False},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
                   "intermediate_size": 18944, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                   "rope_theta": 1000000.0, "tie_word_embeddings": False},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
                     "intermediate_size": 1536, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                     "rope_theta": 100000.0, "tie_word_embeddings": True},
}


def load_config(model: str) -> Any:
    """A transformers config from a named shape, a model directory or a config JSON file.

    Example:
        >>> config = load_config("llama-3-8b")
        >>> config.hidden_size, config.num_key_value_heads, config.vocab_size
        (4096, 8, 128256)
    """
    from transformers import AutoConfig

    if model in SHAPES:
        fields = dict(SHAPES[model])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {model!r} has no config.json")
        return AutoConfig.from_pretrained(path)
    if path.is_file():
        try:
            fields = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{model!r} is not a JSON config file: {err}") from None
        if not isinstance(fields, dict) or "model_type" not in fields:
            raise ValueError(f"config file {model!r} has no 'model_type' field")
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    raise ValueError(f"unknown model {model!r}: give a model directory, a config.json file, "
                     f"or one of the named shapes {sorted(SHAPES)}")
