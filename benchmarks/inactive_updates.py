"""Updates for the layers that sit out an IST step (issue 21 item 2), as a trial of the
budget benchmark before anything goes into the library.

Under IST a layer that is not drawn does not move. :class:`InactiveMomentum` moves it
anyway for the first ``max_steps`` steps after it leaves the active set, on the AdamW state
IST kept for it, without a new gradient: ``j`` steps after it left (``j = 1`` on the first
step it sits out), each parameter of the layer moves by

    p -= lr * scale * beta1**j * m_hat / (sqrt(v_hat) + eps)

with ``m_hat``, ``v_hat`` the bias-corrected moments of its last active step (corrected
with the state's ``step``), ``beta1`` and ``eps`` of the parameter's group. That is the
update an AdamW step with a zero gradient would give if only the first moment decayed
(the naive form, a zero-gradient AdamW step on every inactive layer, also lets ``v``
decay and the bias corrections advance, and never stops), damped by ``scale`` and cut off
after ``max_steps``. The optimizer state is not modified: when the layer is drawn again,
AdamW continues from the state IST kept. No weight decay is applied.

Parameters without state (a layer never active yet, or a state policy that offloaded or
dropped it) are skipped; the CPU default ``"keep"`` keeps every visited layer's state.

Usage (after ``optimizer.step()``, with the set that trained in that step)::

    helper = InactiveMomentum(opt, scale=0.5, max_steps=3)
    trained = opt.active_layers  # before step(): after it, it is the next step's set
    opt.step()
    helper.after_step(lr, trained)

Example:
    >>> import torch
    >>> from ist_optim import ISTOptimizer
    >>> blocks = [torch.nn.Linear(2, 2) for _ in range(4)]
    >>> opt = ISTOptimizer(torch.optim.AdamW, torch.nn.Sequential(*blocks), lr=0.1,
    ...                    seed=0, layers=blocks, sampling="uniform", active_layers=1)
    >>> helper = InactiveMomentum(opt, scale=1.0, max_steps=1)
    >>> helper.after_step(0.1)  # nothing trained yet: nothing to move
    >>> helper.param_updates
    0
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import torch

from ist_optim import ISTOptimizer


class InactiveMomentum:
    """Moves the layers that just left IST's active set on their kept Adam moments.

    Args:
        optimizer: the ``ISTOptimizer`` (its inner optimizer an Adam-style one whose
            per-parameter state holds ``exp_avg``, ``exp_avg_sq`` and ``step``).
        scale: the damping of the moves (0 moves nothing).
        max_steps: how many consecutive sitting-out steps after a layer leaves it moves.

    Attributes:
        param_updates: parameter tensors moved so far.
        layer_updates: (layer, step) moves so far.
        cpu_seconds: CPU time (``time.process_time``) spent in :meth:`after_step`.
    """

    def __init__(self, optimizer: ISTOptimizer, *, scale: float, max_steps: int) -> None:
        if not isinstance(optimizer, ISTOptimizer):
            raise TypeError(f"expected an ISTOptimizer, got {type(optimizer).__name__}")
        if scale < 0 or max_steps < 0:
            raise ValueError(f"scale and max_steps must be >= 0, got {scale}, {max_steps}")
        self.optimizer = optimizer
        self.scale = float(scale)
        self.max_steps = int(max_steps)
        self.param_updates = 0
        self.layer_updates = 0
        self.cpu_seconds = 0.0
        # layer -> steps sat out since it last trained (0: it trained in the last step);
        # a layer that never trained is absent
        self.since_active: dict[int, int] = {}
        # the set that trains in the coming step, as the optimizer said after the last call
        self._coming = list(optimizer.active_layers)
        self._group_of = {id(p): g for g in optimizer.optimizer.param_groups
                          for p in g["params"]}

    def after_step(self, lr: float, trained: Iterable[int] | None = None) -> None:
        """Call right after ``optimizer.step()``. ``trained``: the layers that trained in
        that step (``opt.active_layers`` read before ``step()``); default the set the
        optimizer named as coming at the previous call (or at construction)."""
        start = time.process_time()
        trained = set(self._coming if trained is None else trained)
        moves = []
        for layer in range(self.optimizer.num_layers):
            if layer in trained:
                self.since_active[layer] = 0
            elif layer in self.since_active:
                self.since_active[layer] += 1
                j = self.since_active[layer]
                if j <= self.max_steps and self.scale != 0.0:
                    moves.append((layer, j))
        if moves:
            with torch.no_grad():
                for layer, j in moves:
                    self._move(layer, j, lr)
        self._coming = list(self.optimizer.active_layers)
        self.cpu_seconds += time.process_time() - start

    def _move(self, layer: int, j: int, lr: float) -> None:
        """Move every parameter (with state) of ``layer``, ``j`` steps after it left."""
        state = self.optimizer.optimizer.state
        moved = False
        for p in self.optimizer.layer_groups.params[layer]:
            entry = state.get(p)
            if not entry or "exp_avg" not in entry:
                continue
            group = self._group_of[id(p)]
            beta1, beta2 = group["betas"]
            step = float(entry["step"])
            if step <= 0:
                continue
            exp_avg_sq = entry["max_exp_avg_sq"] if group.get("amsgrad") else entry["exp_avg_sq"]
            bias1 = 1 - beta1 ** step
            bias2_sqrt = math.sqrt(1 - beta2 ** step)
            # as torch's AdamW: denom = sqrt(v) / sqrt(1 - beta2^t) + eps, step size lr / bias1
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(group["eps"])
            p.addcdiv_(entry["exp_avg"], denom, value=-lr * self.scale * beta1 ** j / bias1)
            self.param_updates += 1
            moved = True
        self.layer_updates += moved

    def summary(self) -> dict[str, Any]:
        """The settings and the cost, for a result row."""
        return {"scale": self.scale, "max_steps": self.max_steps,
                "param_updates": self.param_updates, "layer_updates": self.layer_updates,
                "cpu_seconds": self.cpu_seconds}
