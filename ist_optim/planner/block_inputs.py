"""What a decoder block is run with when the planner measures it: the inputs the installed
transformers passes a block in a training forward (rotary embeddings, the attention mask),
and the attention kernel a GPU would run in place of the ``meta`` device's fallback.

* transformers 4.x builds a ``batch x 1 x seq x seq`` attention mask for every training
  forward without a KV cache and repeats the key/value heads for it; transformers 5 passes
  none (the kernel's causal flag does it). :func:`block_mask` asks the installed version.
* With no mask, a GPU runs flash attention; with one, the memory-efficient kernel, which
  takes the mask as a bias in the query's dtype and saves it (:class:`FlashAttention`).
* torch 2.11's FLOP formulas of those kernels refuse fewer key/value heads than query heads
  (grouped-query attention); :data:`GQA_FLOPS` counts them as torch 2.13's do.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["GQA_FLOPS", "FlashAttention", "attention_kernel", "block_mask", "from_config",
           "import_model_class", "rotary_embeddings", "tensors"]


def _with_query_heads(query: Any, key: Any, value: Any) -> tuple[Any, Any, Any]:
    """Shapes of grouped-query attention (fewer key/value heads, ``enable_gqa=True``) with
    the key/value heads repeated to the query's: what the kernel computes."""
    heads = query[-3]
    return query, (*key[:-3], heads, *key[-2:]), (*value[:-3], heads, *value[-2:])


def _sdpa_flops(query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    return sdpa_flop_count(*_with_query_heads(query, key, value))


def _sdpa_backward_flops(grad: Any, query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    return sdpa_backward_flop_count(grad, *_with_query_heads(query, key, value))


#: FLOP formulas of the fused attention kernels that accept grouped-query attention:
#: torch 2.11's own refuse fewer key/value heads than query heads (torch 2.13's count
#: them as these do).
GQA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_efficient_attention: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_backward: _sdpa_backward_flops,
    torch.ops.aten._scaled_dot_product_efficient_attention_backward: _sdpa_backward_flops,
}


class FlashAttention(TorchFunctionMode):
    """Route ``F.scaled_dot_product_attention`` to the fused kernel a GPU would run: flash
    attention for a causal call without a mask; with a mask (transformers 4.x builds one
    for every training forward without a KV cache), the memory-efficient kernel, which
    takes the mask as a bias in the query's dtype and saves it."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        causal = bool(kwargs.get("is_causal", False))
        if mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, 0.0, causal, scale=kwargs.get("scale"))[0]
        if mask.dtype == torch.bool:  # what sdpa does with a boolean mask
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device
                               ).masked_fill(~mask, float("-inf"))
        shape = (*query.shape[:-1], key.shape[-2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, mask.expand(shape), True, 0.0, causal,
            scale=kwargs.get("scale"))[0]


@contextmanager
def attention_kernel(kind: str) -> Iterator[None]:
    if kind == "sdpa":
        with FlashAttention():
            yield
    else:
        yield


def rotary_embeddings(rotary: nn.Module, probe: torch.Tensor, positions: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the rotary embedding for ``positions``, on the meta device.

    transformers < 5 computes them under ``torch.autocast(device_type=x.device.type)``,
    which torch refuses for ``"meta"`` (``unsupported scalarType``); the module's
    ``inv_freq`` gives the same shapes and dtype without entering autocast.
    """
    inv_freq = getattr(rotary, "inv_freq", None)
    if not isinstance(inv_freq, torch.Tensor):
        return rotary(probe, positions)
    freqs = positions[:, :, None].float() * inv_freq.float()[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(probe.dtype), emb.sin().to(probe.dtype)


class _CapturedInputs(Exception):
    """Stops the decoder's forward at its first block, whose inputs were recorded."""


def import_model_class(config: Any) -> type:
    """The causal-LM class of ``config``, its module imported now: call it outside
    ``torch.device("meta")``. transformers imports a model's module at first use, and under
    a device context that import fails on torch 2.7 (torch._dynamo, imported lazily inside
    it, half-initialises), which transformers reports as "Could not find LlamaForCausalLM"."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def from_config(config: Any, dtype: torch.dtype, attention: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                attn_implementation=attention)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        return AutoModelForCausalLM.from_config(config, torch_dtype=dtype,
                                                attn_implementation=attention)


def _tiny_copy(config: Any) -> Any:
    """``config`` with one block and two features per attention head: the same attention
    and mask logic at a negligible size."""
    tiny = copy.deepcopy(config)
    heads = int(config.num_attention_heads)
    tiny.num_hidden_layers = 1
    if getattr(tiny, "layer_types", None):
        tiny.layer_types = list(tiny.layer_types)[:1]
    ids = [getattr(config, f"{name}_token_id", None) for name in ("pad", "bos", "eos")]
    flat = [i for item in ids for i in (item if isinstance(item, list) else [item])
            if isinstance(i, int)]
    tiny.hidden_size, tiny.intermediate_size = 2 * heads, 2
    tiny.vocab_size = max([2, *(i + 1 for i in flat)])  # the special tokens' ids stay valid
    if getattr(tiny, "head_dim", None) is not None:
        tiny.head_dim = 2
    tiny.use_cache = False
    return tiny


def block_mask(config: Any, attention: str, batch_size: int, seq_len: int
                ) -> torch.Tensor | None:
    """The attention mask the installed transformers passes a decoder block in a training
    forward without padding or KV cache, on the meta device: None in transformers 5 (the
    kernel's causal flag does it), a ``batch x 1 x seq x seq`` mask in 4.x. Found by
    running a tiny copy of the model (:func:`_tiny_copy`) on the CPU up to its first block
    at the real sequence length: the mask logic decides on values (is the batch packed?),
    which the meta device does not have."""
    with torch.random.fork_rng(devices=[]):  # its random init must not draw from the
        model = from_config(_tiny_copy(config), torch.float32, attention)  # global RNG
    base = model.get_decoder()
    captured: dict[str, Any] = {}

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        raise _CapturedInputs

    handle = base.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    embeds = torch.zeros(1, seq_len, int(base.config.hidden_size))
    try:
        model.train()
        with torch.no_grad():
            base(inputs_embeds=embeds, position_ids=torch.arange(seq_len).unsqueeze(0),
                 use_cache=False)
    except _CapturedInputs:
        pass
    finally:
        handle.remove()
    if "mask" not in captured:
        raise RuntimeError(f"{type(base).__name__}'s forward did not call its first block")
    mask = captured["mask"]
    if not isinstance(mask, torch.Tensor):
        return None
    shape = (batch_size if mask.shape[0] == 1 else mask.shape[0], *mask.shape[1:])
    return torch.empty(shape, dtype=mask.dtype, device="meta")


def tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors(item)]
    return []


