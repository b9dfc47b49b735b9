"""Shared fixtures: tiny random-init models built from configs (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
from hypothesis import settings

# CI runs the property tests on a fixed example sequence (reproducible, never flaky on a
# rare draw); locally, each run explores new examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (registered in pyproject.toml) skip when no CUDA device is
    visible; ``pytest -m cuda`` selects them (scripts/gpu-check.sh runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def tiny_llama(num_layers: int = 4, hidden: int = 32, vocab: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(gen_state)
    return model


def lora_model(num_layers: int = 4, seed: int = 0, **lora_kwargs):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(num_layers, seed=seed)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
               lora_dropout=0.0, init_lora_weights=False)
    cfg.update(lora_kwargs)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed + 1)
    model = get_peft_model(base, LoraConfig(**cfg))
    torch.random.set_rng_state(gen_state)
    return model


def save_tiny_llama_dir(folder, texts: list[str]):
    """Save a 4-layer random Llama and a byte-level BPE tokenizer trained on ``texts`` to
    ``folder`` (what ``ist-finetune --model DIR`` loads); returns ``folder``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, special_tokens=["</s>"],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def lm_batch(batch: int = 2, seq: int = 8, vocab: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.fixture
def llama_lora():
    return lora_model(4)


def train_steps(model, opt, steps: int, start: int = 0) -> list[list[int]]:
    """Train ``steps`` steps on ``lm_batch(seed=step)``; return each step's active layers."""
    sets = []
    for step in range(start, start + steps):
        sets.append(opt.active_layers)
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    return sets


def params_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------- no test leaks global state
def _global_state() -> dict:
    """torch's process-wide settings a test (or the code under test) could leave changed
    for the tests after it: grad and autocast modes, defaults, thread count, global module
    hooks, torch-function and dispatch modes, saved-tensor hooks."""
    import torch.nn.modules.module as module

    state = {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "num_threads": torch.get_num_threads(),
        "torch_function_modes": torch._C._len_torch_function_stack(),
        "dispatch_modes": torch._C._len_torch_dispatch_stack(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "compiling": torch.compiler.is_compiling(),
    }
    if hasattr(torch, "get_default_device"):
        state["default_device"] = str(torch.get_default_device())
    for device in ("cpu", "cuda"):
        try:
            state[f"autocast_{device}"] = (torch.is_autocast_enabled(device),
                                           torch.get_autocast_dtype(device))
        except (RuntimeError, TypeError):  # torch without per-device autocast queries
            pass
    for name in dir(module):
        if name.startswith("_global_") and name.endswith("hooks"):
            state[name] = len(getattr(module, name))
    try:
        state["saved_tensor_hooks"] = \
            torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, RuntimeError):  # a torch without this query
        pass
    return state


@pytest.fixture(autouse=True)
def _no_leaked_global_state(request):
    """Fail the test that leaves torch's global state changed (and put it back), and put
    the environment variables back, so a test's outcome never depends on the ones that ran
    before it in the same process. (``TrainingArguments`` writes ``ACCELERATE_*``
    variables, ``torch_compile=True`` among them, which the next Trainer's accelerate reads:
    a later test's model would be compiled.)"""
    before = _global_state()
    environ = dict(os.environ)
    yield
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)
    after = _global_state()
    changed = {k: (before[k], after.get(k)) for k in before if after.get(k) != before[k]}
    if not changed:
        return
    torch.set_grad_enabled(before["grad_enabled"])
    torch.set_default_dtype(before["default_dtype"])
    torch.set_num_threads(before["num_threads"])
    pytest.fail(f"{request.node.nodeid} left torch's global state changed: {changed}",
                pytrace=False)
