"""Timing the methods of one budget side by side: the interleaved order, and one timed step.

Ratios of step times are measured in one process, the methods interleaved so that a slow
minute of the machine falls on all of them: each method's warm-up steps first (not
counted; the last one accounted for its peak), then ``rounds`` rounds, in each every
method ``per_turn`` steps in turn, the order rotated by one each round so no method always
follows the same one (:func:`interleaved_order`).

Example:
    >>> interleaved_order(["a", "b"], rounds=2, per_turn=1, warmup=1)
    [('a', False), ('b', False), ('a', True), ('b', True), ('b', True), ('a', True)]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ist_optim import ISTOptimizer, account_step


def interleaved_order(methods: list[str], *, rounds: int, per_turn: int, warmup: int
                      ) -> list[tuple[str, bool]]:
    """The steps of one budget as (method, counted): ``warmup`` uncounted steps of each
    method in turn, then ``rounds`` rounds of ``per_turn`` counted steps of each, round
    ``r`` starting at method ``r mod len(methods)``."""
    order = [(m, False) for _ in range(warmup) for m in methods]
    for r in range(rounds):
        start = r % len(methods) if methods else 0
        for m in methods[start:] + methods[:start]:
            order += [(m, True)] * per_turn
    return order


@dataclass
class Timed:
    """One method at one budget, built and ready to step: the model, its optimizer, its
    batches, and the blocks its next step checkpoints (``checkpointed()``)."""

    name: str
    model: torch.nn.Module
    optimizer: Any
    batches: Iterator[dict[str, torch.Tensor]]
    checkpointed: Callable[[], int]
    device: str = "cpu"
    rows: dict[str, list[Any]] = field(default_factory=lambda: {
        "cpu_seconds": [], "wall_seconds": [], "checkpointed_blocks": []})
    peak_bytes: int | None = None

    def _step(self, batch: dict[str, torch.Tensor]) -> None:
        loss = self.model(**batch).loss  # only the loss kept (planned with keep_logits=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in self.model.parameters() if p.grad is not None], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, *, counted: bool, accounted: bool = False) -> None:
        """One training step; a counted one records its CPU and wall seconds and the blocks
        it checkpointed; an accounted one (:func:`ist_optim.account_step`, slower) its peak."""
        batch = {k: v.to(self.device) for k, v in next(self.batches).items()}
        blocks = self.checkpointed()
        start, start_cpu = time.perf_counter(), time.process_time()
        if accounted:
            peak = account_step(lambda: self._step(batch), model=self.model,
                                optimizer=self.optimizer).peak_bytes
            self.peak_bytes = max(self.peak_bytes or 0, peak)
        else:
            self._step(batch)
        cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
        if counted:
            self.rows["cpu_seconds"].append(cpu)
            self.rows["wall_seconds"].append(wall)
            self.rows["checkpointed_blocks"].append(blocks)

    def close(self) -> None:
        """Release the optimizer's hooks (``ISTOptimizer``)."""
        if isinstance(self.optimizer, ISTOptimizer):
            self.optimizer.close()


def accounted_steps(order: list[tuple[str, bool]]) -> set[int]:
    """The positions in ``order`` of each method's last uncounted (warm-up) step: the step
    accounted for its peak, after the first one has built the optimizer state.

    Example:
        >>> sorted(accounted_steps([("a", False), ("b", False), ("a", False), ("a", True)]))
        [1, 2]
    """
    last = {m: i for i, (m, counted) in enumerate(order) if not counted}
    return set(last.values())


def run_interleaved(timed: dict[str, Timed], order: list[tuple[str, bool]],
                    log: Callable[[str], None] = print) -> None:
    """Step the methods of ``timed`` in ``order``, each one's last warm-up step accounted
    (:func:`accounted_steps`)."""
    accounted = accounted_steps(order)
    for i, (name, counted) in enumerate(order):
        timed[name].step(counted=counted, accounted=i in accounted)
        rows = timed[name].rows
        if counted:
            log(f"  [{i + 1}/{len(order)}] {name}: {rows['cpu_seconds'][-1]:.2f} CPU s, "
                f"{rows['checkpointed_blocks'][-1]} blocks checkpointed")
