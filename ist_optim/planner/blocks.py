"""What one decoder block, the embeddings and the head cost, measured on the ``meta`` device.

:func:`measure_model` builds a one-block copy of a transformers causal LM from its config
on the ``meta`` device (no memory, no weights), optionally wraps the target linears of the
block with LoRA adapters that behave like peft's (:class:`MetaLoraLinear`), and runs the
block at the real batch x sequence shape under :class:`~ist_optim.planner.tracker.LiveMemory`,
:func:`torch.autograd.graph.saved_tensors_hooks` and :class:`torch.utils.flop_counter.
FlopCounterMode`, once per way a block can take part in a step (:data:`BLOCK_MODES`). The
head (final norm, LM head, loss) is measured the same way. Nothing here is a fitted
constant: every byte is a tensor that autograd saved or an operator allocated.

Attention: with ``attention="sdpa"`` the call to
:func:`torch.nn.functional.scaled_dot_product_attention` is replaced by the fused kernel a
GPU runs (flash attention without a mask, the memory-efficient kernel with the mask
transformers 4.x builds), so the block saves what a GPU saves (query, key, value, output,
log-sum-exp, the mask's bias), not the math fallback's ``seq x seq`` matrices that the
``meta`` device would otherwise pick; the block gets the inputs the installed transformers
passes it (:mod:`.block_inputs`). ``attention="eager"`` runs the model's eager attention
as written.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .block_inputs import (
    GQA_FLOPS,
    attention_kernel,
    block_mask,
    from_config,
    import_model_class,
    rotary_embeddings,
    tensors,
)
from .quantized import MetaLinear4bit, QuantSpec, quantize_block_linears
from .roofline import OpCost, OpCounter
from .tracker import LiveMemory

__all__ = ["BLOCK_MODES", "HEAD_MODES", "MetaLora4bitLinear", "MetaLoraLinear", "ModelCosts",
           "PieceCost", "measure_model"]

#: (trains, input requires grad): a block that trains in the middle of the graph, the
#: lowest trained block (backward stops at its input), a frozen block that backward passes
#: through, and a frozen block below the lowest trained one (no graph at all).
BLOCK_MODES: tuple[tuple[bool, bool], ...] = ((True, True), (True, False), (False, True),
                                              (False, False))
#: (head trains, its input requires grad).
HEAD_MODES: tuple[tuple[bool, bool], ...] = ((True, True), (True, False), (False, True))


@dataclass(frozen=True)
class PieceCost:
    """Memory and FLOPs of one piece (a block or the head) in one mode, in bytes.

    Attributes:
        saved_bytes: tensors autograd keeps for backward after the forward, deduplicated by
            storage (parameters and rotary tables excluded).
        forward_extra_bytes: peak bytes allocated during the forward, above its input.
        after_forward_bytes: bytes still allocated when the forward returns (saved tensors,
            the output, for the head the logits and the loss).
        backward_extra_bytes: peak bytes allocated during the backward above what was live
            when it started (gradient buffers, parameter gradients, temporaries).
        forward_flops, backward_flops: FLOPs counted by :class:`FlopCounterMode`.
        forward_ops, backward_ops: every operator of the forward / the backward with its
            FLOPs and bytes moved (:class:`~ist_optim.planner.roofline.OpCounter`), what
            the step-time model runs on a :class:`~ist_optim.planner.roofline.Device`.
    """

    saved_bytes: int
    forward_extra_bytes: int
    after_forward_bytes: int
    backward_extra_bytes: int
    forward_flops: int
    backward_flops: int
    forward_ops: tuple[OpCost, ...] = ()
    backward_ops: tuple[OpCost, ...] = ()


@dataclass(frozen=True)
class ModelCosts:
    """Everything the estimator needs about one model shape, batch and sequence length.

    Attributes:
        num_layers: decoder blocks.
        block_weight_bytes: one block's base weights (as stored, in ``dtype``).
        block_param_count: one block's base parameters.
        adapter_bytes, adapter_param_count: one block's LoRA adapters (0 for full training).
        embed_bytes, head_bytes, norm_bytes: input embeddings, LM head (0 when tied), final
            norm.
        embed_param_count, head_param_count, norm_param_count: their parameters.
        numels: the element count of every parameter tensor of each piece (``"block"``,
            ``"adapter"`` (one block's), ``"embed"``, ``"head"``, ``"norm"``), for
            optimizers whose state depends on tensor sizes (8-bit Adam).
        hidden_bytes: one hidden-state tensor (batch x seq x hidden, ``dtype``).
        logits_bytes: the logits the model returns (batch x seq x vocab, ``dtype``).
        blocks: :class:`PieceCost` per :data:`BLOCK_MODES` entry.
        heads: :class:`PieceCost` per :data:`HEAD_MODES` entry.
        shapes: the shape of every parameter tensor of each piece (keys as ``numels``),
            for optimizers whose state depends on matrix shapes (GaLore, APOLLO).
        quantized: the block's linear layers are stored in 4 bits (``block_weight_bytes``
            then counts the packed weights and their quantization constants).
    """

    num_layers: int
    block_weight_bytes: int
    block_param_count: int
    adapter_bytes: int
    adapter_param_count: int
    embed_bytes: int
    head_bytes: int
    norm_bytes: int
    embed_param_count: int
    head_param_count: int
    norm_param_count: int
    hidden_bytes: int
    logits_bytes: int
    numels: dict[str, tuple[int, ...]]
    blocks: dict[tuple[bool, bool], PieceCost]
    heads: dict[tuple[bool, bool], PieceCost]
    shapes: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    quantized: bool = False


class MetaLoraLinear(nn.Module):
    """A linear layer with a LoRA adapter that computes, casts and saves what peft's does.

    peft's ``lora.Linear`` (with ``lora_dropout=0``) runs the base layer, casts the input to
    the adapter's dtype (float32 by default: peft upcasts bf16/fp16 adapters), adds
    ``lora_B(lora_A(x)) * scaling`` and casts the sum back to the base output's dtype.

    Example:
        >>> layer = MetaLoraLinear(nn.Linear(8, 4, bias=False), rank=2, alpha=4)
        >>> layer(torch.ones(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float,
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        device = base.weight.device
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device,
                                dtype=adapter_dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device,
                                dtype=adapter_dtype)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        result = result + self.lora_B(self.lora_A(x)) * self.scaling
        return result.to(dtype)


class MetaLora4bitLinear(MetaLoraLinear):
    """LoRA on a 4-bit base layer, as peft's ``lora.bnb.Linear4bit`` computes it: the base
    output is cloned ("defensively", peft's comment), the adapter output is cast back to the
    base output's dtype before the sum.

    Example:
        >>> from ist_optim.memory.quantized import MetaLinear4bit
        >>> layer = MetaLora4bitLinear(MetaLinear4bit(nn.Linear(8, 4, bias=False)), 2, 4)
        >>> layer(torch.ones(3, 8)).shape
        torch.Size([3, 4])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x).clone()
        dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        output = (self.lora_B(self.lora_A(x)) * self.scaling).to(dtype)
        return result + output


def _one_block_model(config: Any, dtype: torch.dtype, attention: str) -> nn.Module:
    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    if hasattr(small, "layer_types") and getattr(small, "layer_types", None):
        small.layer_types = list(small.layer_types)[:1]
    small.use_cache = False
    small._attn_implementation = attention
    import_model_class(small)  # not under the meta device (torch 2.7)
    with torch.device("meta"):
        model = from_config(small, dtype, attention)
    model.requires_grad_(False)
    return model


def _wrap_lora(block: nn.Module, targets: Sequence[str], rank: int, alpha: float,
               adapter_dtype: torch.dtype) -> list[nn.Parameter]:
    found: set[str] = set()
    adapters: list[nn.Parameter] = []
    for name, module in list(block.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, (nn.Linear, MetaLinear4bit)):
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            kind = MetaLora4bitLinear if isinstance(module, MetaLinear4bit) else MetaLoraLinear
            wrapped = kind(module, rank, alpha, adapter_dtype)
            setattr(parent, leaf, wrapped)
            adapters += [wrapped.lora_A.weight, wrapped.lora_B.weight]
            found.add(leaf)
    missing = sorted(set(targets) - found)
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in block.named_modules()
                          if isinstance(m, (nn.Linear, MetaLinear4bit))})
        raise ValueError(f"lora_targets {missing} name no linear layer of the decoder block; "
                         f"its linear layers are {linears}")
    return adapters


def _numel_bytes(params: Sequence[nn.Parameter]) -> tuple[int, int]:
    return (sum(p.numel() for p in params),
            sum(p.numel() * p.element_size() for p in params))


def _run_piece(forward: Callable[[], torch.Tensor], existing: Sequence[torch.Tensor],
               exclude: Sequence[torch.Tensor], attention: str, needs_backward: bool
               ) -> PieceCost:
    """Run ``forward`` (and backward from its output) on meta under the trackers."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in skip:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    flops = FlopCounterMode(display=False, custom_mapping=GQA_FLOPS)
    forward_ops, backward_ops = OpCounter(GQA_FLOPS), OpCounter(GQA_FLOPS)
    with LiveMemory("meta", existing=existing) as live:
        base = live.current_bytes
        with flops, forward_ops, attention_kernel(attention), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        forward_flops = flops.get_total_flops()
        forward_extra = live.peak_bytes - base
        after = live.current_bytes - base
        backward_extra = 0
        backward_flops = 0
        if needs_backward and out.requires_grad:
            grad = torch.empty_like(out)
            start = live.current_bytes
            live.reset_peak()
            with FlopCounterMode(display=False, custom_mapping=GQA_FLOPS) as bflops, \
                    backward_ops:
                out.backward(grad)
            backward_extra = live.peak_bytes - start
            backward_flops = bflops.get_total_flops()
        del out
    return PieceCost(sum(saved.values()), forward_extra, after, backward_extra,
                     forward_flops, backward_flops, tuple(forward_ops.ops),
                     tuple(backward_ops.ops))


def measure_model(config: Any, *, batch_size: int, seq_len: int, dtype: torch.dtype,
                  lora: tuple[Sequence[str], int, float, torch.dtype] | None,
                  attention: str = "sdpa", quant: QuantSpec | None = None,
                  grad_step: Callable[[str, tuple[int, ...]], int] | None = None
                  ) -> ModelCosts:
    """Measure one block and the head of ``config``'s model on the meta device.

    Args:
        config: a transformers ``PretrainedConfig`` of a decoder-only causal LM.
        batch_size, seq_len: the training batch.
        dtype: the dtype the model's weights are stored and computed in.
        lora: ``(targets, rank, alpha, adapter_dtype)`` to wrap the block's linears with
            :class:`MetaLoraLinear`, or None for full training.
        attention: ``"sdpa"`` (the fused kernel a GPU runs) or ``"eager"``.
        quant: store every linear layer of the block in 4 bits (QLoRA's base), as
            :class:`~ist_optim.memory.quantized.MetaLinear4bit`; None: in ``dtype``.
        grad_step: layer-wise optimizers (the HF Trainer's ``*_layerwise``): each trained
            parameter is updated in its post-accumulate-grad hook and its gradient freed;
            ``grad_step(piece, shape)`` gives the bytes that update allocates for a moment
            (piece ``"block"`` or ``"head"``). The measured backward then holds no
            parameter gradient beyond the one being updated.

    Example:
        >>> from transformers import LlamaConfig
        >>> config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...                      num_attention_heads=4, vocab_size=256)
        >>> costs = measure_model(config, batch_size=2, seq_len=16, dtype=torch.float32,
        ...                       lora=None)
        >>> costs.num_layers, costs.hidden_bytes
        (4, 8192)
    """
    model = _one_block_model(config, dtype, attention)
    base = model.get_decoder()
    block = base.layers[0]
    quantized = quantize_block_linears(block, quant) if quant is not None else []
    adapters: list[nn.Parameter] = []
    if lora is not None:
        targets, rank, alpha, adapter_dtype = lora
        adapters = _wrap_lora(block, targets, rank, alpha, adapter_dtype)
        for p in adapters:
            p.requires_grad_(False)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    norm = base.norm
    embed_params = list(embed.parameters())
    head_params = [p for p in head.parameters()
                   if all(p is not q for q in embed_params)]
    adapter_ids = {id(p) for p in adapters}
    block_params = [p for p in block.parameters() if id(p) not in adapter_ids]
    every_param = list(model.parameters())

    hidden = config.hidden_size
    shape = (batch_size, seq_len, hidden)
    positions = torch.arange(seq_len, device="meta").unsqueeze(0)
    probe = torch.empty(shape, device="meta", dtype=dtype)
    rotary = getattr(base, "rotary_emb", None)
    rope = rotary_embeddings(rotary, probe, positions) if rotary is not None else None
    mask = block_mask(config, attention, batch_size, seq_len)
    inputs = tensors((rope, mask))  # made once a step, shared by the blocks

    def step_in_hooks(params: Sequence[nn.Parameter], piece: str) -> list[Any]:
        if grad_step is None:
            return []

        def hook(p: torch.Tensor) -> None:
            nbytes = grad_step(piece, tuple(p.shape))
            if nbytes:
                torch.empty(nbytes, dtype=torch.uint8, device="meta")  # the update's buffers
            p.grad = None

        return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]

    def block_run(trains: bool, input_grad: bool) -> PieceCost:
        trained = adapters if lora is not None else block_params
        for p in trained:
            p.requires_grad_(trains)
        handles = step_in_hooks(trained, "block")
        x = torch.empty(shape, device="meta", dtype=dtype, requires_grad=input_grad)

        def forward() -> torch.Tensor:
            out = block(x, attention_mask=mask, position_ids=positions,
                        position_embeddings=rope)
            return out[0] if isinstance(out, tuple) else out

        cost = _run_piece(forward, [*every_param, x, *inputs],
                          [*every_param, *inputs], attention,
                          needs_backward=trains or input_grad)
        for handle in handles:
            handle.remove()
        for p in trained:
            p.requires_grad_(False)
        return cost

    labels = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")

    def head_run(trains: bool, input_grad: bool) -> PieceCost:
        trained = [*head_params, *norm.parameters()] if head_params else \
            [*embed_params, *norm.parameters()]
        for p in trained:
            p.requires_grad_(trains)
        handles = step_in_hooks(trained, "head")
        x = torch.empty(shape, device="meta", dtype=dtype, requires_grad=input_grad)
        kept: list[torch.Tensor] = []

        def forward() -> torch.Tensor:
            logits = head(norm(x))
            kept.append(logits)  # the caller's output object keeps the logits
            return model.loss_function(logits=logits, labels=labels,
                                       vocab_size=config.vocab_size)

        cost = _run_piece(forward, [*every_param, x, labels], [*every_param],
                          attention, needs_backward=True)
        for handle in handles:
            handle.remove()
        model.requires_grad_(False)
        return cost

    blocks = {mode: block_run(*mode) for mode in BLOCK_MODES}
    heads = {mode: head_run(*mode) for mode in HEAD_MODES}
    element = torch.empty((), dtype=dtype).element_size()
    block_count, block_bytes = _numel_bytes(block_params)
    if quantized:  # packed weights and quantization constants, in their real element counts
        packed = {id(layer.weight) for layer in quantized}
        block_count = sum(layer.numel for layer in quantized) + sum(
            p.numel() for p in block_params if id(p) not in packed)
        block_bytes = sum(layer.storage_bytes for layer in quantized) + sum(
            p.numel() * p.element_size() for p in block_params if id(p) not in packed)
    adapter_count, adapter_bytes = _numel_bytes(adapters)
    embed_count, embed_bytes = _numel_bytes(embed_params)
    head_count, head_bytes = _numel_bytes(head_params)
    norm_count, norm_bytes = _numel_bytes(list(norm.parameters()))
    return ModelCosts(
        num_layers=int(config.num_hidden_layers), block_weight_bytes=block_bytes,
        block_param_count=block_count, adapter_bytes=adapter_bytes,
        adapter_param_count=adapter_count, embed_bytes=embed_bytes, head_bytes=head_bytes,
        norm_bytes=norm_bytes, embed_param_count=embed_count, head_param_count=head_count,
        norm_param_count=norm_count, hidden_bytes=batch_size * seq_len * hidden * element,
        logits_bytes=batch_size * seq_len * int(config.vocab_size) * element,
        numels={"block": tuple(p.numel() for p in block_params),
                "adapter": tuple(p.numel() for p in adapters),
                "embed": tuple(p.numel() for p in embed_params),
                "head": tuple(p.numel() for p in head_params),
                "norm": tuple(p.numel() for p in norm.parameters())},
        blocks=blocks, heads=heads,
        shapes={"block": tuple(tuple(p.shape) for p in block_params),
                "adapter": tuple(tuple(p.shape) for p in adapters),
                "embed": tuple(tuple(p.shape) for p in embed_params),
                "head": tuple(tuple(p.shape) for p in head_params),
                "norm": tuple(tuple(p.shape) for p in norm.parameters())},
        quantized=bool(quantized))
