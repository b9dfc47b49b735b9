"""Peak training memory of any decoder shape, before renting the GPU: ``estimate_peak_memory``.

Two stages, so that a caller who asks many questions about one model pays once:

1. :class:`MemoryPlanner` measures, on the ``meta`` device (no memory, no weights), what one
   decoder block and the head save for backward and allocate during forward and backward
   at the real batch x sequence shape, in each way a block can take part in a step
   (:func:`~ist_optim.planner.blocks.measure_model`): about a second for a 7B shape.
2. :meth:`MemoryPlanner.estimate` walks one training step over those per-piece costs (a
   forward through every block, the loss, a backward down to the lowest block that needs
   one, the optimizer step), keeps the running total of weights, gradients, optimizer
   state, saved activations and transient buffers, and returns its maximum: pure
   arithmetic, microseconds, for any active set and any set of checkpointed blocks.

The step modelled is the steady state of ``out = model(input_ids=ids, labels=ids);
out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)``: the optimizer state of
the trained layers exists from the second step on, gradients exist from the backward to the
step, and ``out`` keeps the logits until the next forward has returned (set
``keep_logits=False`` for a loop that drops them). See docs/memory.md ("Planning memory")
for the comparison with measured peaks.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .blocks import ModelCosts, measure_model
from .projection import PROJECTED_OPTIMIZERS, ProjectionSpec, projected_step
from .quantized import QuantSpec
from .roofline import Device, OpCost
from .steptime import StepTime, optimizer_bytes_per_param, price_step

__all__ = ["DEFAULT_LORA_TARGETS", "METHODS", "OPTIMIZERS", "MemoryEstimate", "MemoryPlanner",
           "estimate_peak_memory", "estimate_step_time"]

#: The adapters of the shared GPU measurements (LoRA on q, k, v, up, down).
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
#: ``"adamw"``: torch AdamW, state in the parameter's dtype. ``"adamw8bit"``: bitsandbytes
#: AdamW8bit (blockwise 8-bit state for tensors of at least 4096 elements, fp32 below).
#: ``"adamw-fp32-master"``: AdamW on float32 master copies of the trained parameters, as
#: BAdam keeps for bf16/fp16 models (fp32 copy, fp32 gradient, fp32 state).
#: ``"galore"``, ``"apollo"``, ``"apollo-mini"``: galore-torch's ``GaLoreAdamW`` and
#: apollo-torch's ``APOLLOAdamW`` (APOLLO-Mini: rank 1, one scale per tensor) as the HF
#: Trainer sets them up (``optim="galore_adamw"`` / ``"apollo_adamw"``): the 2-D weights of
#: the blocks projected to ``projection_rank``, everything else plain AdamW; full
#: fine-tuning only (see :mod:`ist_optim.planner.projection`).
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "adamw-fp32-master",
                               *PROJECTED_OPTIMIZERS)
#: ``"lora"``: frozen base in ``dtype``, adapters train. ``"qlora"``: the same with every
#: linear layer of the blocks stored in 4 bits (bitsandbytes NF4/FP4, see
#: :mod:`ist_optim.planner.quantized`). ``"full"``: the weights train.
METHODS: tuple[str, ...] = ("lora", "qlora", "full")
_METHODS = METHODS
_PARTS = ("weights", "gradients", "optimizer_state", "activations", "transient")
#: A piece of the model run one way in a step: (``"block"`` or ``"head"``, its mode, a key
#: of :data:`~ist_optim.planner.blocks.BLOCK_MODES` / ``HEAD_MODES``, and ``"forward"``,
#: ``"backward"`` or ``"recompute"``).
Run = tuple[str, tuple[bool, bool], str]


@dataclass(frozen=True)
class MemoryEstimate:
    """The predicted peak of one training step on the accelerator.

    Attributes:
        peak_bytes: predicted peak of allocated device memory.
        breakdown: bytes at the peak by kind: ``weights``, ``gradients``,
            ``optimizer_state``, ``activations`` (saved for backward), ``transient``
            (logits, gradient buffers, temporaries).
        phase: where in the step the peak falls (``"forward"``, ``"loss backward"``,
            ``"backward of block 7"``, ``"optimizer step"``, ...).
        host_bytes: optimizer state kept in host memory (layers not in ``state_layers``).
        flops: FLOPs of one step (forward, backward and any recomputation).
        settings: what was estimated (batch, method, optimizer, active layers, ...).
        runs: how many times the step runs each piece each way, by :data:`Run` (what
            :meth:`MemoryPlanner.step_time` prices).
        trained_params: parameters the optimizer step updates.
    """

    peak_bytes: int
    breakdown: dict[str, int]
    phase: str
    host_bytes: int = 0
    flops: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    runs: dict[Run, int] = field(default_factory=dict)
    trained_params: int = 0

    @property
    def peak_gib(self) -> float:
        """``peak_bytes`` in GiB."""
        return self.peak_bytes / 2**30


def _state_bytes(numels: Sequence[int], element: int, optimizer: str) -> int:
    if optimizer == "adamw":
        return 2 * element * sum(numels)
    if optimizer == "adamw-fp32-master":
        return 2 * 4 * sum(numels)
    total = 0  # adamw8bit
    for n in numels:
        if n >= 4096:
            total += 2 * n + 2 * 4 * math.ceil(n / 256) + 2 * 256 * 4
        else:
            total += 2 * 4 * n
    return total


class _Step:
    """Running totals of one step, and their maximum."""

    def __init__(self, **start: int) -> None:
        self.now = {part: start.get(part, 0) for part in _PARTS}
        self.peak = -1
        self.at: dict[str, int] = {}
        self.phase = ""

    def add(self, part: str, nbytes: int) -> None:
        self.now[part] += nbytes

    def mark(self, phase: str, extra: int = 0) -> None:
        total = sum(self.now.values()) + extra
        if total > self.peak:
            self.peak = total
            self.at = dict(self.now)
            self.at["transient"] += extra
            self.phase = phase


class MemoryPlanner:
    """Per-piece memory costs of one model shape and batch, measured once; estimates are sums.

    Args:
        config: a transformers ``PretrainedConfig`` of a decoder-only causal LM (Llama,
            Qwen2, Mistral, ... shapes); nothing is loaded or allocated.
        batch_size, seq_len: the training batch.
        dtype: dtype of the model's weights and compute (the GPU runs used bfloat16).
        method: one of :data:`METHODS`: ``"lora"`` (frozen base, adapters train),
            ``"qlora"`` (frozen 4-bit base, adapters train) or ``"full"`` (weights train).
        lora_rank, lora_alpha, lora_targets: the adapters (peft's ``r``,
            ``lora_alpha`` (default ``2 * r``), ``target_modules``).
        adapter_dtype: dtype of the adapter weights (peft upcasts bf16/fp16 adapters to
            float32 by default).
        optimizer: one of :data:`OPTIMIZERS`.
        foreach: AdamW's multi-tensor step (torch's default on GPUs), which allocates one
            moment-sized temporary for all parameters at once; False: one parameter at a
            time.
        attention: ``"sdpa"`` (the fused attention kernel a GPU runs) or ``"eager"``.
        keep_logits: the default of :meth:`estimate`'s ``keep_logits``: whether the training
            loop holds the model's output (and so its logits) through backward, as
            ``out = model(**batch); out.loss.backward()`` does. False for a loop that keeps
            only the loss (``loss = model(**batch).loss``, the HF Trainer): one logits tensor
            less at the peak.
        double_quant: ``"qlora"``: ``bnb_4bit_use_double_quant`` (8-bit scales).
        projection_rank: GaLore / APOLLO rank (None: the HF Trainer's default, 128; 1 for
            ``"apollo-mini"``).

    Example:
        >>> from transformers import LlamaConfig
        >>> config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...                      num_attention_heads=4, vocab_size=256)
        >>> planner = MemoryPlanner(config, batch_size=2, seq_len=16, dtype=torch.float32)
        >>> all_layers = planner.estimate()
        >>> top_only = planner.estimate(active_layers=[3])
        >>> top_only.peak_bytes < all_layers.peak_bytes
        True
        >>> sorted(all_layers.breakdown)
        ['activations', 'gradients', 'optimizer_state', 'transient', 'weights']
    """

    def __init__(self, config: Any, *, batch_size: int, seq_len: int,
                 dtype: torch.dtype = torch.bfloat16, method: str = "lora",
                 lora_rank: int = 8, lora_alpha: float | None = None,
                 lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
                 adapter_dtype: torch.dtype = torch.float32, optimizer: str = "adamw",
                 foreach: bool = True, attention: str = "sdpa",
                 keep_logits: bool = True, double_quant: bool = False,
                 projection_rank: int | None = None) -> None:
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                            ("lora_rank", lora_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
        self.projection: ProjectionSpec | None = None
        if optimizer in PROJECTED_OPTIMIZERS:
            if method != "full":
                raise ValueError(f"optimizer {optimizer!r} projects full-rank weight gradients: "
                                 f"use method='full', not {method!r}")
            default = PROJECTED_OPTIMIZERS[optimizer]
            rank = default["rank"] if projection_rank is None else projection_rank
            self.projection = ProjectionSpec(str(default["kind"]), rank,  # type: ignore[arg-type]
                                             str(default["scale_type"]),
                                             bool(default.get("layerwise", False)))
        elif projection_rank is not None:
            raise ValueError(f"projection_rank applies to {list(PROJECTED_OPTIMIZERS)}, not "
                             f"optimizer {optimizer!r}")
        if attention not in ("sdpa", "eager"):
            raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if not isinstance(getattr(config, key, None), int):
                raise TypeError(f"config must be a transformers PretrainedConfig of a decoder "
                                f"LM with {key}; got {type(config).__name__}")
        if isinstance(lora_targets, str):
            raise TypeError(f"lora_targets must be a list of module names, got {lora_targets!r}")
        self.config = config
        self.keep_logits = bool(keep_logits)
        self.method = method
        self.optimizer = optimizer
        self.foreach = foreach
        self.dtype = dtype
        self.element = torch.empty((), dtype=dtype).element_size()
        lora = None
        if method in ("lora", "qlora"):
            alpha = float(2 * lora_rank if lora_alpha is None else lora_alpha)
            lora = (tuple(lora_targets), lora_rank, alpha, adapter_dtype)
            self.trained_dtype = adapter_dtype
        else:
            self.trained_dtype = dtype
        self.trained_element = torch.empty((), dtype=self.trained_dtype).element_size()
        self.settings = {"batch_size": batch_size, "seq_len": seq_len, "dtype": str(dtype),
                         "method": method, "optimizer": optimizer,
                         "lora_rank": lora_rank if lora is not None else None}
        if method == "qlora":
            self.settings["double_quant"] = bool(double_quant)
        if self.projection is not None:
            self.settings["projection_rank"] = self.projection.rank
        self.layerwise = self.projection is not None and self.projection.layerwise
        #: The measured per-piece costs (:class:`~ist_optim.planner.blocks.ModelCosts`).
        self.costs: ModelCosts = measure_model(config, batch_size=batch_size, seq_len=seq_len,
                                               dtype=dtype, lora=lora, attention=attention,
                                               quant=QuantSpec(bool(double_quant))
                                               if method == "qlora" else None,
                                               grad_step=self._update_bytes
                                               if self.layerwise else None)

    def _update_bytes(self, piece: str, shape: tuple[int, ...]) -> int:
        """Buffers of one parameter's own (layer-wise) optimizer step, at a projector update."""
        if self.projection is None:
            return 0
        target = piece == "block" and len(shape) == 2
        return projected_step([shape], [target], self.element, self.projection, update=True)[1]

    @property
    def num_layers(self) -> int:
        """Decoder blocks of the model."""
        return self.costs.num_layers

    def _layers(self, value: Sequence[int] | None, name: str, default: Sequence[int]
                ) -> list[int]:
        if value is None:
            return sorted(set(default))
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"{name} must be a list of layer indices or None, got {value!r}")
        out = sorted(set(value))
        bad = [i for i in out if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"{name} {bad} out of range: the model has {self.num_layers} "
                             f"layers (0..{self.num_layers - 1})")
        return out

    def _trained(self, train_embeddings: bool, train_head: bool) -> dict[str, tuple[int, ...]]:
        numels = self.costs.numels
        per_block = numels["adapter"] if self.method != "full" else numels["block"]
        out = {"block": per_block}
        out["embed"] = numels["embed"] if train_embeddings else ()
        head = numels["head"] or (numels["embed"] if not train_embeddings else ())  # tied
        out["head"] = head + numels["norm"] if train_head else ()
        return out

    def estimate(self, active_layers: Sequence[int] | None = None, *,
                 gradient_checkpointing: bool | Sequence[int] = False,
                 cut_backward: bool = True, train_embeddings: bool = False,
                 train_head: bool = False, state_layers: Sequence[int] | None = None,
                 offloaded_layers: Sequence[int] | None = None,
                 keep_logits: bool | None = None,
                 projection_update: bool = True) -> MemoryEstimate:
        """Peak of one steady-state training step with ``active_layers`` training.

        Args:
            active_layers: indices of the blocks that train (None: all).
            gradient_checkpointing: True (every block), False, or the indices of the
                checkpointed blocks (non-reentrant checkpointing: a block keeps only its
                input and recomputes its forward in backward).
            cut_backward: backward stops at the input of the lowest trained piece (what
                autograd does when nothing below requires grad, and what
                :class:`~ist_optim.BackwardCut` enforces). False: backward runs down to
                the first block, as after ``enable_input_require_grads()``.
            train_embeddings, train_head: the input embeddings / the final norm and LM
                head train too (LISA trains both).
            state_layers: blocks whose optimizer state is on the device (None: the active
                ones, as with IST's ``state_policy="offload"`` or an optimizer that only
                ever saw the active parameters). Active blocks left out are counted in
                ``host_bytes`` (their state offloaded to host memory); listing inactive
                blocks adds their state on the device (``state_policy="keep"``).
            offloaded_layers: blocks whose optimizer state waits in host memory (IST's
                ``state_policy="offload"`` holds every visited inactive layer there);
                counted in ``host_bytes`` only.
            keep_logits: the caller keeps the returned logits until the next forward ends
                (None: the planner's ``keep_logits``).
            projection_update: GaLore / APOLLO: the step recomputes the projectors (every
                ``update_proj_gap`` steps, the first included: the step a budget must hold);
                False: a step between two updates. The layer-wise variants are always
                planned at an update (their updates run inside the backward, measured once).
        """
        if keep_logits is None:
            keep_logits = self.keep_logits
        n = self.num_layers
        active = self._layers(active_layers, "active_layers", range(n))
        if not active and not (train_embeddings or train_head):
            raise ValueError("nothing trains: give active_layers, train_embeddings or "
                             "train_head")
        if isinstance(gradient_checkpointing, bool):
            checkpointed = set(range(n)) if gradient_checkpointing else set()
        else:
            checkpointed = set(self._layers(gradient_checkpointing, "gradient_checkpointing",
                                            ()))
        on_device = set(self._layers(state_layers, "state_layers", active))
        offloaded = set(self._layers(offloaded_layers, "offloaded_layers", ()))
        trained = self._trained(train_embeddings, train_head)
        modes, lowest = _block_modes(n, active, cut_backward, train_embeddings)
        head_mode = (train_head, lowest < n or train_embeddings)

        block_state = self._block_state()
        outside = trained["embed"] + trained["head"]
        step = _Step(weights=self._weights(trained, len(active)),
                     optimizer_state=block_state * len(on_device)
                     + _state_bytes(outside, self.element, "adamw" if self.projection
                                    else self.optimizer))
        grads = {"block": sum(trained["block"]) * self.trained_element,
                 "head": sum(trained["head"]) * self.element,
                 "embed": sum(trained["embed"]) * self.element}
        if self.layerwise:  # each gradient is freed by its own optimizer's step
            grads = dict.fromkeys(grads, 0)
        flops, runs = _walk(step, self.costs, modes, lowest, head_mode, checkpointed,
                            grads=grads, keep_logits=keep_logits)
        if self.layerwise:
            if trained["embed"]:
                step.mark("embedding backward", sum(
                    n * self.element + self._update_bytes("embed", s)
                    for n, s in zip(trained["embed"], self.costs.shapes["embed"], strict=True)))
        else:
            self._optimizer_step(step, trained, len(active), block_state, projection_update)
        settings = dict(self.settings, active_layers=active,
                        gradient_checkpointing=sorted(checkpointed),
                        cut_backward=cut_backward, train_embeddings=train_embeddings,
                        train_head=train_head)
        host = block_state * len((set(active) - on_device) | (offloaded - on_device))
        stepped = (sum(trained["block"]) * len(active)
                   + sum(trained["embed"]) + sum(trained["head"]))
        return MemoryEstimate(peak_bytes=step.peak, breakdown=step.at, phase=step.phase,
                              host_bytes=host, flops=flops, settings=settings, runs=runs,
                              trained_params=stepped)

    def step_time(self, estimate: MemoryEstimate, device: Device | str = "h100") -> StepTime:
        """The predicted time of the step ``estimate`` describes, on ``device`` (a
        :class:`~ist_optim.planner.roofline.Device`, or a name in
        :data:`~ist_optim.planner.roofline.DEVICES`): see :mod:`ist_optim.planner.steptime`.
        Compare set-ups by the ratio of their times on one device.

        Example:
            >>> from transformers import LlamaConfig
            >>> config = LlamaConfig(hidden_size=64, intermediate_size=128,
            ...                      num_hidden_layers=4, num_attention_heads=4, vocab_size=256)
            >>> planner = MemoryPlanner(config, batch_size=2, seq_len=16, dtype=torch.float32)
            >>> every = planner.step_time(planner.estimate())
            >>> top = planner.step_time(planner.estimate(active_layers=[3]))
            >>> top.seconds < every.seconds
            True
        """
        if not isinstance(estimate, MemoryEstimate) or not estimate.runs:
            raise TypeError(f"Invalid estimate: {type(estimate).__name__}; expected a "
                            f"MemoryEstimate from this planner's estimate()")
        master = self.optimizer == "adamw-fp32-master"
        per_param = optimizer_bytes_per_param(torch.float32 if master else self.trained_dtype,
                                              self.foreach and not master)
        costs = self.costs
        dequantize = OpCost(0, costs.block_weight_bytes + costs.block_param_count
                            * self.element) if costs.quantized else None
        return price_step(costs, estimate.runs, trained_params=estimate.trained_params,
                          update_bytes_per_param=per_param, device=device,
                          embedding_grad=bool(estimate.settings.get("train_embeddings")),
                          dequantize=dequantize)

    def _block_state(self) -> int:
        """Optimizer state of one trained block."""
        if self.projection is None:
            return _state_bytes(self.costs.numels["block"] if self.method == "full"
                                else self.costs.numels["adapter"], self.trained_element,
                                self.optimizer)
        shapes = self.costs.shapes["block"]
        return projected_step(shapes, [len(s) == 2 for s in shapes], self.element,
                              self.projection, update=False)[0]

    def _projected_order(self, trained: dict[str, tuple[int, ...]], num_active: int
                         ) -> tuple[list[tuple[int, ...]], list[bool]]:
        """The trained shapes in the HF Trainer's order: the plain group (embeddings, the
        blocks' vectors, final norm, head) first, then the projected 2-D block weights."""
        shapes = self.costs.shapes
        block = shapes["block"]
        plain = [*(shapes["embed"] if trained["embed"] else ()),
                 *[s for s in block if len(s) != 2] * num_active,
                 *((shapes["head"] or shapes["embed"]) + shapes["norm"]
                   if trained["head"] else ())]
        matrices = [s for s in block if len(s) == 2] * num_active
        return [*plain, *matrices], [False] * len(plain) + [True] * len(matrices)

    def _weights(self, trained: dict[str, tuple[int, ...]], num_active: int) -> int:
        costs = self.costs
        n = self.num_layers
        lora_weights = costs.adapter_bytes * n if self.method != "full" else 0
        weights = (n * costs.block_weight_bytes + lora_weights + costs.embed_bytes
                   + costs.head_bytes + costs.norm_bytes)
        if self.optimizer == "adamw-fp32-master":  # fp32 copies of the trained parameters
            weights += 4 * (sum(trained["block"]) * num_active
                            + sum(trained["embed"] + trained["head"]))
        return weights

    def _optimizer_step(self, step: _Step, trained: dict[str, tuple[int, ...]],
                        num_active: int, block_state: int, projection_update: bool) -> None:
        outside = trained["embed"] + trained["head"]
        biggest = max([*trained["block"], *outside, 0])
        if self.projection is not None:
            shapes, targets = self._projected_order(trained, num_active)
            _, temporaries = projected_step(shapes, targets, self.element, self.projection,
                                            update=projection_update)
            step.mark("optimizer step (projection update)" if projection_update
                      else "optimizer step", temporaries)
        elif self.optimizer == "adamw-fp32-master":
            # fp32 gradients of the master copies, then a per-tensor update
            step.add("gradients", 4 * (sum(trained["block"]) * num_active + sum(outside)))
            step.mark("optimizer step", 4 * biggest)
        elif self.optimizer == "adamw" and self.foreach:  # one moment-sized temporary
            step.mark("optimizer step", (block_state * num_active
                                         + _state_bytes(outside, self.element, "adamw")) // 2)
        elif self.optimizer == "adamw":
            step.mark("optimizer step", biggest * self.trained_element)
        else:
            step.mark("optimizer step")


def _block_modes(n: int, active: Sequence[int], cut_backward: bool, input_grads: bool
                 ) -> tuple[list[tuple[bool, bool]], int]:
    """(trains, input requires grad) per block, and the lowest block backward reaches."""
    if input_grads or not cut_backward:
        lowest, first_input_grad = 0, True
    elif active:
        lowest, first_input_grad = active[0], False
    else:
        lowest, first_input_grad = n, False
    modes = []
    for i in range(n):
        if i < lowest:
            modes.append((False, False))
        else:
            modes.append((i in active, first_input_grad if i == lowest else True))
    return modes, lowest


def _walk(step: _Step, costs: ModelCosts, modes: Sequence[tuple[bool, bool]], lowest: int,
          head_mode: tuple[bool, bool], checkpointed: set[int], grads: dict[str, int],
          keep_logits: bool) -> tuple[int, dict[Run, int]]:
    """Forward, loss and backward over the per-piece costs; returns the FLOPs and how many
    times each piece ran each way (:data:`Run`)."""
    logits_kept = costs.logits_bytes if keep_logits else 0
    step.add("transient", logits_kept + costs.hidden_bytes)  # old logits, embeddings out
    flops = 0
    runs: Counter[Run] = Counter()
    for i, mode in enumerate(modes):
        cost = costs.blocks[mode]
        flops += cost.forward_flops
        runs["block", mode, "forward"] += 1
        if i in checkpointed and mode != (False, False):  # keeps only its input
            step.mark("forward", costs.blocks[(False, False)].forward_extra_bytes)
            step.add("activations", costs.hidden_bytes)
        else:
            step.mark("forward", cost.forward_extra_bytes)
            step.add("activations", cost.saved_bytes)
    head = costs.heads[head_mode]
    flops += head.forward_flops + head.backward_flops
    runs["head", head_mode, "forward"] += 1
    runs["head", head_mode, "backward"] += 1
    step.mark("loss forward", head.forward_extra_bytes)
    step.add("activations", head.saved_bytes)
    # The forward has returned: the previous output's logits go (kept), or else the new
    # output's (the loop keeps only the loss, so nothing refers to them).
    step.add("transient", head.after_forward_bytes - head.saved_bytes - costs.logits_bytes)
    step.mark("loss backward", head.backward_extra_bytes)
    step.add("activations", -head.saved_bytes)
    step.add("gradients", grads["head"])
    for i in range(len(modes) - 1, lowest - 1, -1):
        cost = costs.blocks[modes[i]]
        if i in checkpointed:
            step.mark(f"recompute of block {i}", cost.forward_extra_bytes)
            step.add("activations", cost.saved_bytes)
            flops += cost.forward_flops
            runs["block", modes[i], "recompute"] += 1
        step.mark(f"backward of block {i}", cost.backward_extra_bytes)
        flops += cost.backward_flops
        runs["block", modes[i], "backward"] += 1
        step.add("activations", -cost.saved_bytes)
        if i in checkpointed:  # the checkpoint's input goes with the block's graph
            step.add("activations", -costs.hidden_bytes)
        if modes[i][0]:
            step.add("gradients", grads["block"])
    if grads["embed"]:
        step.mark("embedding backward", grads["embed"])
        step.add("gradients", grads["embed"])
    return flops, dict(runs)


def estimate_peak_memory(config: Any, *, batch_size: int, seq_len: int,
                         dtype: torch.dtype = torch.bfloat16, method: str = "lora",
                         lora_rank: int = 8, lora_alpha: float | None = None,
                         lora_targets: Sequence[str] = DEFAULT_LORA_TARGETS,
                         active_layers: Sequence[int] | None = None,
                         gradient_checkpointing: bool | Sequence[int] = False,
                         optimizer: str = "adamw", **kwargs: Any) -> MemoryEstimate:
    """Predict the peak device memory of one training step, without building the model.

    One call measures the model's pieces on the ``meta`` device and walks a step (see
    :class:`MemoryPlanner`; keep a planner to ask about many active sets cheaply).

    Args:
        config: a transformers ``PretrainedConfig`` (no weights are loaded).
        batch_size, seq_len: the training batch.
        dtype: weights and compute dtype (with ``"qlora"``: of everything but the 4-bit
            block linears).
        method: ``"lora"``, ``"qlora"`` (4-bit base, see :data:`METHODS`) or ``"full"``.
        lora_rank, lora_alpha, lora_targets: the adapters for ``"lora"`` / ``"qlora"``.
        active_layers: blocks that train (None: all); the rest are frozen and backward
            stops at the lowest one.
        gradient_checkpointing: True, False, or the checkpointed blocks.
        optimizer: one of :data:`OPTIMIZERS` (``"galore"``, ``"apollo"`` and
            ``"apollo-mini"`` with ``method="full"``).
        **kwargs: ``adapter_dtype``, ``foreach``, ``attention``, ``double_quant`` and
            ``projection_rank`` go to :class:`MemoryPlanner`; ``cut_backward``,
            ``train_embeddings``, ``train_head``, ``state_layers``, ``offloaded_layers``,
            ``keep_logits`` and ``projection_update`` to :meth:`MemoryPlanner.estimate`.

    Example:
        >>> from transformers import LlamaConfig
        >>> config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...                      num_attention_heads=4, vocab_size=256)
        >>> est = estimate_peak_memory(config, batch_size=2, seq_len=16, dtype=torch.float32,
        ...                            method="lora", lora_rank=4, active_layers=[2, 3])
        >>> est.peak_bytes == sum(est.breakdown.values())
        True
        >>> qlora = estimate_peak_memory(config, batch_size=2, seq_len=16, method="qlora",
        ...                              lora_rank=4)
        >>> lora = estimate_peak_memory(config, batch_size=2, seq_len=16, method="lora",
        ...                             lora_rank=4)
        >>> qlora.breakdown["weights"] < lora.breakdown["weights"]
        True
        >>> galore = estimate_peak_memory(config, batch_size=2, seq_len=16, method="full",
        ...                               optimizer="galore", projection_rank=8)
        >>> adamw = estimate_peak_memory(config, batch_size=2, seq_len=16, method="full")
        >>> galore.breakdown["optimizer_state"] < adamw.breakdown["optimizer_state"]
        True
    """
    planner_keys = {"adapter_dtype", "foreach", "attention", "double_quant", "projection_rank"}
    estimate_keys = {"cut_backward", "train_embeddings", "train_head", "state_layers",
                     "offloaded_layers", "keep_logits", "projection_update"}
    unknown = sorted(set(kwargs) - planner_keys - estimate_keys)
    if unknown:
        raise TypeError(f"estimate_peak_memory got unexpected keyword(s) {unknown}; accepted: "
                        f"{sorted(planner_keys | estimate_keys)}")
    planner = MemoryPlanner(config, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                            method=method, lora_rank=lora_rank, lora_alpha=lora_alpha,
                            lora_targets=lora_targets, optimizer=optimizer,
                            **{k: v for k, v in kwargs.items() if k in planner_keys})
    return planner.estimate(active_layers, gradient_checkpointing=gradient_checkpointing,
                            **{k: v for k, v in kwargs.items() if k in estimate_keys})



def estimate_step_time(config: Any, *, batch_size: int, seq_len: int,
                       device: Device | str = "h100", **kwargs: Any) -> StepTime:
    """Predict the time of one training step, without building the model: the companion of
    :func:`estimate_peak_memory`, with the same keywords (and ``device``, a
    :class:`~ist_optim.planner.roofline.Device` or a name in
    :data:`~ist_optim.planner.roofline.DEVICES`). See :mod:`ist_optim.planner.steptime`;
    compare set-ups by the ratio of their times.

    Example:
        >>> from transformers import LlamaConfig
        >>> config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...                      num_attention_heads=4, vocab_size=256)
        >>> plain = estimate_step_time(config, batch_size=2, seq_len=16)
        >>> top = estimate_step_time(config, batch_size=2, seq_len=16, active_layers=[3])
        >>> top.seconds < plain.seconds
        True
    """
    planner_keys = {"dtype", "method", "lora_rank", "lora_alpha", "lora_targets",
                    "adapter_dtype", "foreach", "attention", "double_quant", "projection_rank",
                    "optimizer"}
    planner = MemoryPlanner(config, batch_size=batch_size, seq_len=seq_len,
                            **{k: v for k, v in kwargs.items() if k in planner_keys})
    estimate = planner.estimate(**{k: v for k, v in kwargs.items() if k not in planner_keys})
    return planner.step_time(estimate, device)
