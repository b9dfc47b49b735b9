"""``memory_budget=``: checkpoint only the blocks a step needs checkpointed to fit.

IST's memory and time per step are set by the active set (above all its lowest layer).
Under a budget, a step whose active set fits as it is runs without activation
checkpointing; a step that does not fit checkpoints the fewest blocks that make it fit.

* :class:`CheckpointPolicy` predicts each step's peak (with the offline planner,
  :mod:`ist_optim.planner`) and picks the blocks to checkpoint;
* :class:`MemoryBudget` switches their checkpointing per step
  (:class:`~ist_optim.core.recompute.BlockCheckpointer`).

``parse_memory_budget`` (:mod:`ist_optim.config`) and ``planner_for_model``
(:mod:`ist_optim.planner.from_model`) are re-exported here for code that imported them
from this module.

See docs/memory.md, "Training inside a memory budget".
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..config import parse_memory_budget
from ..core.compile import is_compiled_block
from ..core.groups import LayerGroups
from ..core.recompute import BlockCheckpointer
from ..planner.estimate import MemoryPlanner
from ..planner.from_model import planner_for_model, trains_embeddings_and_head

__all__ = ["PLANNING_HEADROOM", "WORKSPACE_THREADS", "BudgetDecision", "CheckpointPolicy",
           "MemoryBudget", "cuda_workspace_bytes", "parse_memory_budget",
           "planner_for_model"]

#: Share of the budget the policy leaves free: it plans each step for ``(1 - headroom)`` of
#: the budget. The planner's error on accounted runs was within 0.4% (LLaMA-2-7B shapes on
#: an H200) and 0.3% (SmolLM2-135M on CPU, where planning to 100% put a step 1.5 MiB over
#: a 950 MiB budget); the rest is room for what it does not model (allocator slack).
PLANNING_HEADROOM = 0.02

#: Decisions :class:`CheckpointPolicy` keeps, one per active set seen (the first ones): with
#: every layer active, or a draw seen before, a step's decision is then a lookup.
DECISIONS_KEPT = 4096

#: Threads that run matrix products in a training step, each holding its own cuBLAS
#: workspace: the one that runs the forward (and the update), and autograd's device thread
#: that runs the backward.
WORKSPACE_THREADS = 2


def _kib_pairs(config: str) -> int | None:
    """Bytes of a ``CUBLAS_WORKSPACE_CONFIG`` value (``:SIZE_KiB:COUNT`` pairs)."""
    pairs = re.findall(r":([0-9]+):([0-9]+)", config)
    return sum(int(size) * int(count) for size, count in pairs) * 1024 if pairs else None


def cuda_workspace_bytes(device: torch.device | str) -> int:
    """Device memory torch's cuBLAS workspaces hold while a model on ``device`` trains (0
    off CUDA): the caching allocator gives each (thread, stream) that runs a matrix
    product a workspace at its first one and keeps it, so ``max_memory_allocated`` counts
    it while no tensor of the step owns it. A step holds :data:`WORKSPACE_THREADS` of
    them, each ``CUBLAS_WORKSPACE_CONFIG``'s total or torch's default: 32 MiB on Hopper
    (sm_90), 8 MiB + 128 KiB elsewhere. cuBLASLt shares that workspace (torch's default);
    with ``TORCH_CUBLASLT_UNIFIED_WORKSPACE=0`` it has its own of
    ``CUBLASLT_WORKSPACE_SIZE`` KiB, counted as large as cuBLAS's when that is unset.

    Example:
        >>> cuda_workspace_bytes("cpu")
        0
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    configured = _kib_pairs(os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""))
    if configured is None:
        major, minor = torch.cuda.get_device_capability(device)
        configured = (4096 * 8 if (major, minor) == (9, 0) else 4096 * 2 + 16 * 8) * 1024
    per_thread = configured
    if os.environ.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "1").strip().lower() in (
            "0", "false", "no", "off"):
        lt = os.environ.get("CUBLASLT_WORKSPACE_SIZE", "").strip()
        per_thread += int(lt) * 1024 if lt.isdigit() else configured
    return WORKSPACE_THREADS * per_thread

@dataclass(frozen=True)
class BudgetDecision:
    """What :class:`CheckpointPolicy` chose for one step.

    Attributes:
        checkpointed: sorted indices of the blocks to checkpoint.
        peak_bytes: the predicted peak of the step with them checkpointed.
        fits: whether ``peak_bytes`` is within the policy's limit (the budget less its
            headroom).
    """

    checkpointed: list[int]
    peak_bytes: int
    fits: bool


class CheckpointPolicy:
    """Picks, per active set, the fewest blocks to checkpoint for the step to fit.

    A step fits when its predicted peak is within :attr:`limit`, the budget less a
    ``headroom`` share (:data:`PLANNING_HEADROOM`, 2%) for what the planner does not model
    and less ``reserve_bytes`` (on CUDA, the cuBLAS workspaces: :func:`cuda_workspace_bytes`).
    No block when the step fits without checkpointing. Otherwise blocks are added one at a
    time until it fits, in this order: first the active
    blocks from the lowest up (they save the most for backward), then the frozen blocks
    above the lowest active one (backward runs through them, so they save activations
    too). A block whose checkpointing does not lower the predicted peak is skipped (the
    top block is recomputed as soon as backward starts, while every block below still
    holds its activations). Blocks below the lowest active block save nothing when the
    backward is cut, and are never chosen. When even every useful block does not fit,
    those are checkpointed (the lowest peak the search finds) and a warning is given once.

    Args:
        planner: the model's :class:`~ist_optim.MemoryPlanner`.
        budget: bytes (see :func:`parse_memory_budget`).
        cut_backward, train_embeddings, train_head: passed to
            :meth:`MemoryPlanner.estimate`.
        keeps_all_state: the optimizer state of every layer stays on the device
            (``state_policy="keep"``); else only the active layers'.
        headroom: share of ``budget`` left free (see :data:`PLANNING_HEADROOM`): a step
            fits when its predicted peak is within :attr:`limit` =
            ``budget * (1 - headroom) - reserve_bytes``.
        reserve_bytes: bytes of the budget that memory outside the step's tensors holds
            (``MemoryBudget.for_model``: :func:`cuda_workspace_bytes` of the model's device).

    Example:
        >>> from transformers import LlamaConfig
        >>> config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...                      num_attention_heads=4, vocab_size=256)
        >>> planner = MemoryPlanner(config, batch_size=2, seq_len=16, dtype=torch.float32)
        >>> roomy = CheckpointPolicy(planner, 10**9)
        >>> roomy.decide([1, 3]).checkpointed, roomy.fits_as_is([1, 3])
        ([], True)
        >>> tight = planner.estimate([1, 3], gradient_checkpointing=[1]).peak_bytes
        >>> decision = CheckpointPolicy(planner, tight, headroom=0.0).decide([1, 3])
        >>> decision.checkpointed, decision.peak_bytes == tight
        ([1], True)
        >>> CheckpointPolicy(planner, tight).fits_as_is([1, 3])
        False
    """

    def __init__(self, planner: MemoryPlanner, budget: int, *, cut_backward: bool = True,
                 train_embeddings: bool = False, train_head: bool = False,
                 keeps_all_state: bool = False, headroom: float = PLANNING_HEADROOM,
                 reserve_bytes: int = 0) -> None:
        if isinstance(headroom, bool) or not isinstance(headroom, int | float) \
                or not 0.0 <= headroom < 1.0:
            raise ValueError(f"Invalid headroom: {headroom!r}; expected a share of the budget "
                             f"in [0, 1), e.g. {PLANNING_HEADROOM}")
        if isinstance(reserve_bytes, bool) or not isinstance(reserve_bytes, int) \
                or reserve_bytes < 0:
            raise ValueError(f"Invalid reserve_bytes: {reserve_bytes!r}; expected bytes >= 0")
        self.planner = planner
        self.budget = budget
        self.headroom = float(headroom)
        self.reserve_bytes = reserve_bytes
        #: The predicted peak a step may reach: ``budget * (1 - headroom) - reserve_bytes``.
        self.limit = int(budget * (1.0 - self.headroom)) - reserve_bytes
        self.cut_backward = cut_backward
        self._options: dict[str, Any] = {
            "cut_backward": cut_backward, "train_embeddings": train_embeddings,
            "train_head": train_head,
            "state_layers": list(range(planner.num_layers)) if keeps_all_state else None}
        self._warned = False
        self._decisions: dict[tuple[int, tuple[int, ...]], BudgetDecision] = {}

    def peak(self, active: Sequence[int], checkpointed: Sequence[int]) -> int:
        """Predicted peak bytes of a step training ``active`` with ``checkpointed``."""
        return self.planner.estimate(list(active), gradient_checkpointing=list(checkpointed),
                                     **self._options).peak_bytes

    def fits_as_is(self, active: Sequence[int]) -> bool:
        """Whether a step training ``active`` fits without checkpointing any block: its
        predicted peak is within :attr:`limit` (what ``budget_redraws=`` asks of a draw)."""
        return self.peak(active, []) <= self.limit

    def order(self, active: Sequence[int]) -> list[int]:
        """The blocks in the order they are checkpointed (see the class docstring)."""
        active = sorted(set(active))
        lowest = active[0] if active and self.cut_backward else 0
        frozen = [i for i in range(lowest, self.planner.num_layers) if i not in active]
        return active + frozen

    def decide(self, active: Sequence[int]) -> BudgetDecision:
        """The blocks to checkpoint in a step that trains ``active`` (kept for the next step
        that trains the same set: planning is pure arithmetic on fixed costs, so the answer
        cannot change; :data:`DECISIONS_KEPT` sets at most)."""
        blocks = tuple(sorted(set(active)))
        key = (self.limit, blocks)  # a changed limit plans anew
        kept = self._decisions.get(key)
        if kept is not None:
            return BudgetDecision(list(kept.checkpointed), kept.peak_bytes, kept.fits)
        decision = self._decide(blocks)
        if len(self._decisions) < DECISIONS_KEPT:
            self._decisions[key] = BudgetDecision(list(decision.checkpointed),
                                                  decision.peak_bytes, decision.fits)
        return decision

    def _decide(self, active: Sequence[int]) -> BudgetDecision:
        chosen: list[int] = []
        peak = self.peak(active, chosen)
        for block in self.order(active):
            if peak <= self.limit:
                break
            trial = self.peak(active, [*chosen, block])
            if trial < peak:  # e.g. the top block: recomputed at once, it saves nothing
                chosen.append(block)
                peak = trial
        fits = peak <= self.limit
        if not fits and not self._warned:
            self._warned = True
            warnings.warn(
                f"memory_budget of {self.budget:,} bytes (planned to {self.limit:,}: "
                f"{self.headroom:.0%} left free, {self.reserve_bytes:,} bytes reserved for "
                f"cuBLAS workspaces) is below the predicted peak of "
                f"training layers {sorted(active)} even with checkpointing "
                f"({peak:,} bytes); checkpointing blocks {sorted(chosen)}, the lowest "
                f"peak found (warned once)", stacklevel=3)
        return BudgetDecision(sorted(chosen), peak, fits)


class MemoryBudget:
    """A :class:`CheckpointPolicy` applied to a model's blocks through a
    :class:`~ist_optim.core.recompute.BlockCheckpointer`: what ``ISTOptimizer``'s
    ``memory_budget=`` runs after each draw of the active set.

    Args:
        policy: decides the blocks to checkpoint per active set.
        blocks: the model's blocks (the optimizer's layers), as many as the planner's.

    Raises:
        ValueError: when the planner describes another number of blocks, or a block went
            through :func:`~ist_optim.compile_blocks`.
    """

    def __init__(self, policy: CheckpointPolicy, blocks: Sequence[nn.Module]) -> None:
        if policy.planner.num_layers != len(blocks):
            raise ValueError(
                f"the memory planner describes {policy.planner.num_layers} blocks but the "
                f"optimizer trains {len(blocks)} layers; memory_budget needs one planner "
                f"block per layer (pass a matching memory_planner=)")
        compiled = [i for i, block in enumerate(blocks) if is_compiled_block(block)]
        if compiled:
            raise ValueError(
                f"memory_budget cannot switch the checkpointing of compiled blocks (blocks "
                f"{compiled} went through compile_blocks; torch 2.13 fails to compile a "
                f"checkpointed block that records no graph): drop memory_budget, or build "
                f"the optimizer on uncompiled blocks")
        self.policy = policy
        self.checkpointer = BlockCheckpointer(blocks)
        if self.checkpointer.took_over:
            warnings.warn(
                "the model's gradient checkpointing is replaced by memory_budget, which "
                "checkpoints per step only the blocks that step needs to fit; drop "
                "gradient_checkpointing=True (or gradient_checkpointing_enable()) to silence "
                "this", stacklevel=4)
        self.decision: BudgetDecision | None = None

    @classmethod
    def for_model(cls, model: nn.Module, optimizer: Optimizer, layers: LayerGroups,
                  budget: int, *, shape: tuple[int, int] | None,
                  planner: MemoryPlanner | None, cut_backward: bool,
                  keeps_all_state: bool) -> MemoryBudget:
        """Build the planner from ``shape`` and the optimizer's ``layers`` (or take
        ``planner``) and the policy's options from the model and the optimizer's
        parameters; on CUDA the policy reserves the cuBLAS workspaces
        (:func:`cuda_workspace_bytes` of the parameters' device).

        Raises:
            ValueError: when neither or both of ``shape`` and ``planner`` are given, or
                the model cannot be described (see :func:`planner_for_model`).
        """
        if (shape is None) == (planner is None):
            raise ValueError(
                "memory_budget needs the batch it must hold: pass memory_shape=(batch_size, "
                "seq_len) of the largest batch, or memory_planner=MemoryPlanner(...) (one of "
                "the two)")
        if shape is not None:
            planner = planner_for_model(model, optimizer, batch_size=shape[0],
                                        seq_len=shape[1], layers=layers)
        elif not isinstance(planner, MemoryPlanner):
            raise TypeError(f"memory_planner must be an ist_optim.MemoryPlanner, got "
                            f"{type(planner).__name__}")
        assert planner is not None  # for type checkers: exactly one of the two was given
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        train_embeddings, train_head = trains_embeddings_and_head(model, trainable)
        policy = CheckpointPolicy(
            planner, budget, cut_backward=cut_backward, train_embeddings=train_embeddings,
            train_head=train_head, keeps_all_state=keeps_all_state,
            reserve_bytes=cuda_workspace_bytes(trainable[0].device) if trainable else 0)
        return cls(policy, layers.modules)

    def fits_as_is(self, active: Sequence[int]) -> bool:
        """Whether ``active`` fits without checkpointing (:meth:`CheckpointPolicy.fits_as_is`);
        checkpoints nothing."""
        return self.policy.fits_as_is(active)

    def apply(self, active: Sequence[int]) -> BudgetDecision:
        """Decide for ``active`` and checkpoint exactly the chosen blocks."""
        self.decision = self.policy.decide(active)
        self.checkpointer.set(self.decision.checkpointed)
        return self.decision

    def take_back(self) -> bool:
        """Re-apply the current decision if something else changed the blocks'
        checkpointing since (the HF Trainer's ``gradient_checkpointing=True`` turns every
        layer on after the optimizer was built); returns whether it had."""
        if self.decision is None or not self.checkpointer.changed_elsewhere():
            return False
        self.checkpointer.set(self.decision.checkpointed)
        return True

    def report(self) -> dict[str, Any]:
        """``memory_budget``, ``predicted_peak_bytes`` and ``checkpointed_layers`` of the
        coming step."""
        decision = self.decision
        return {"memory_budget": self.policy.budget,
                "predicted_peak_bytes": None if decision is None else decision.peak_bytes,
                "checkpointed_layers": [] if decision is None else list(decision.checkpointed)}

    def close(self) -> None:
        """Give the blocks back their own checkpointing."""
        self.checkpointer.remove()
