"""The :class:`~ist_optim.MemoryPlanner` of a model in hand: read from the model's config,
its adapters and the blocks the optimizer trains (:class:`~ist_optim.LayerGroups`).

What ``memory_shape=`` builds for ``memory_budget=``; see docs/memory.md, "Training inside
a memory budget".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..core.groups import LayerGroups, discover_layers
from .estimate import MemoryPlanner

__all__ = ["optimizer_kind", "planner_for_model", "trains_embeddings_and_head"]


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft


def _blocks(model: nn.Module, optimizer: Optimizer,
            layers: LayerGroups | Sequence[nn.Module] | None) -> list[nn.Module]:
    if isinstance(layers, LayerGroups):
        return list(layers.modules)
    if layers is not None:
        return list(layers)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    return [block for _, block in discover_layers(model, trainable=trainable)]


def _adapters(blocks: Sequence[nn.Module]) -> tuple[list[str], list[int], dict[int, Any],
                                                     torch.dtype]:
    """peft LoRA adapters of the blocks: targets, ranks, alpha by rank, adapters' dtype."""
    targets, ranks, alphas, dtype = set(), [], {}, torch.float32
    for block in blocks:
        for name, module in block.named_modules():
            r, lora_a = getattr(module, "r", None), getattr(module, "lora_A", None)
            if not isinstance(r, dict) or not isinstance(lora_a, nn.ModuleDict):
                continue
            for adapter in r:
                if adapter in lora_a:
                    targets.add(name.rsplit(".", 1)[-1])
                    ranks.append(r[adapter])
                    alphas[r[adapter]] = module.lora_alpha[adapter]
                    dtype = lora_a[adapter].weight.dtype
    return sorted(targets), ranks, alphas, dtype


def planner_for_model(model: nn.Module, optimizer: Optimizer, *, batch_size: int,
                      seq_len: int, keep_logits: bool = True,
                      layers: LayerGroups | Sequence[nn.Module] | None = None) -> MemoryPlanner:
    """The :class:`~ist_optim.MemoryPlanner` of ``model`` (a transformers Llama-style
    causal LM, bare or wrapped by peft) training with ``optimizer`` on ``batch_size`` x
    ``seq_len`` tokens.

    Read from the model: the config, the weights' dtype, the attention implementation
    (``"eager"``, else the fused kernel); read from its blocks (``layers``: the optimizer's
    :class:`~ist_optim.LayerGroups` or their modules; default: discovered as
    ``ISTOptimizer`` discovers them): peft LoRA adapters (targets, the largest rank, its
    alpha, the adapters' dtype; no adapters: full training) and a bitsandbytes 4-bit base
    (``Linear4bit`` modules: ``method="qlora"``, double quantization read from the
    weights' quant state). The optimizer is read by :func:`optimizer_kind` (GaLore and
    APOLLO from their projected group, for full fine-tuning; bitsandbytes 8-bit
    optimizers as AdamW8bit); any other is modelled as AdamW, so optimizers with less
    state (SGD, Adafactor) are over-estimated, never under. ``keep_logits``: see
    :class:`~ist_optim.MemoryPlanner` (False for a loop that keeps only the loss).

    Raises:
        ValueError: for a model that is not a transformers Llama-style causal LM (a
            ``config`` with ``hidden_size``, input embeddings), or whose blocks are not the
            config's ``num_hidden_layers``, naming ``memory_planner=`` as the way to
            describe it.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(
        ...     hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...     num_attention_heads=4, vocab_size=64))
        >>> planner = planner_for_model(model, torch.optim.AdamW(model.parameters()),
        ...                             batch_size=1, seq_len=8)
        >>> planner.num_layers, planner.method
        (2, 'full')
    """
    base = _base(model)
    config = getattr(base, "config", None)
    if (config is None or not isinstance(getattr(config, "hidden_size", None), int)
            or not hasattr(base, "get_input_embeddings")):
        raise ValueError(
            f"memory_shape= can only describe transformers Llama-style causal LMs (a config "
            f"with hidden_size, input embeddings, decoder blocks); {type(base).__name__} is "
            f"not one: pass memory_planner=MemoryPlanner(<a Llama-style config of its "
            f"shape>, ...) instead")
    blocks = _blocks(model, optimizer, layers)
    depth = getattr(config, "num_hidden_layers", None)
    if depth != len(blocks):
        raise ValueError(
            f"memory_shape= describes {type(base).__name__} from its config, which has "
            f"{depth} layers, but the optimizer trains {len(blocks)} blocks: pass "
            f"memory_planner=MemoryPlanner(<a config of {len(blocks)} layers>, ...) instead")
    dtype = base.get_input_embeddings().weight.dtype
    targets, ranks, alphas, adapter_dtype = _adapters(blocks)
    foreach = optimizer.defaults.get("foreach")
    kind, projection_rank = optimizer_kind(optimizer)
    kwargs: dict[str, Any] = dict(
        batch_size=batch_size, seq_len=seq_len, dtype=dtype,
        optimizer=kind, foreach=foreach is not False,
        attention="eager" if getattr(config, "_attn_implementation", None) == "eager"
        else "sdpa", keep_logits=keep_logits)
    quantized = [m for block in blocks for m in block.modules()
                 if type(m).__name__ == "Linear4bit"]
    if ranks:
        rank = max(ranks)
        kwargs.update(method="qlora" if quantized else "lora", lora_rank=rank,
                      lora_alpha=alphas[rank], lora_targets=targets,
                      adapter_dtype=adapter_dtype)
    else:
        kwargs.update(method="full")
        if projection_rank is not None:
            kwargs.update(projection_rank=projection_rank)
    if ranks and projection_rank is not None:  # the planner projects full fine-tuning only
        kwargs.update(optimizer="adamw")
    if quantized and ranks:  # bitsandbytes 4-bit base: nested quant state = double quant
        state = getattr(quantized[0].weight, "quant_state", None)
        kwargs.update(double_quant=bool(getattr(state, "nested", False)))
    return MemoryPlanner(config, **kwargs)


def optimizer_kind(optimizer: Optimizer) -> tuple[str, int | None]:
    """The planner's name for ``optimizer`` (:data:`~ist_optim.planner.estimate.OPTIMIZERS`)
    and its projection rank: galore-torch's ``GaLoreAdamW`` and apollo-torch's
    ``APOLLOAdamW`` (told by their class's module and name) from their projected group
    (the one with a ``rank``; APOLLO-Mini is rank 1 with ``scale_type="tensor"``),
    bitsandbytes 8-bit optimizers as
    ``"adamw8bit"``, any other as ``"adamw"`` (no projection rank).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> optimizer_kind(torch.optim.AdamW([w]))
        ('adamw', None)
        >>> class APOLLOAdamW(torch.optim.AdamW): ...
        >>> optimizer_kind(APOLLOAdamW([{"params": [w], "rank": 1, "scale_type": "tensor"}]))
        ('apollo-mini', 1)
    """
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__name__}".lower()  # apollo-torch's class is "AdamW"
    ranks = [int(g["rank"]) for g in optimizer.param_groups if g.get("rank") is not None]
    if ranks and ("galore" in name or "apollo" in name):
        rank = max(ranks)
        if "galore" in name:
            return "galore", rank
        mini = rank == 1 and any(g.get("scale_type") == "tensor"
                                 for g in optimizer.param_groups)
        return ("apollo-mini" if mini else "apollo"), rank
    return ("adamw8bit" if "8bit" in name else "adamw"), None


def trains_embeddings_and_head(model: nn.Module,
                               trainable: Sequence[torch.Tensor]) -> tuple[bool, bool]:
    """Whether ``trainable`` holds the input embedding's weight, and the output head's
    (the planner's ``train_embeddings`` and ``train_head``).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(
        ...     hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=4, vocab_size=64))
        >>> trains_embeddings_and_head(model, [model.lm_head.weight])
        (False, True)
    """
    base = _base(model)

    def trains(getter: str) -> bool:
        module = getattr(base, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        return weight is not None and any(weight is p for p in trainable)

    return trains("get_input_embeddings"), trains("get_output_embeddings")
