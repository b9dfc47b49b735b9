"""``ActiveSchedule``: how many layers train at each step, like a learning-rate schedule.

IST trains ``active_layers`` (``N_u``) of the ``L`` layers per step. Sparse steps cost
progress while the loss falls fast (early in a run) and pay off once it falls slowly
(docs/benchmarks.md, "Inside one memory budget"). The schedule lets the count follow that:

* ``dense_steps=N``: every layer trains in the first ``N`` steps, then ``N_u``;
* ``ramp_steps=R`` (after the dense steps, if any): the count falls linearly from ``L``
  towards ``N_u`` over ``R`` steps, then stays at ``N_u``;
* ``active_schedule=rule``: any ``rule(step) -> count`` (an int, or a fraction of ``L`` as
  ``active_layers`` takes it), ``step`` counting the optimizer steps taken before the one
  being drawn for (0 for the first step).

The count is a pure function of the step count, which the sampler saves in checkpoints,
so a run resumed in the middle of a warm-up continues it exactly.

Example:
    >>> s = ActiveSchedule(num_layers=8, num_active=2, dense_steps=2, ramp_steps=3)
    >>> [s.count(step) for step in range(7)]
    [8, 8, 7, 5, 4, 2, 2]
    >>> ActiveSchedule(8, 2, rule=lambda step: 0.5 if step < 1 else 2).count(0)
    4
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .draws import resolve_count

__all__ = ["ActiveRule", "ActiveSchedule"]

ActiveRule = Callable[[int], "int | float"]


@dataclass(frozen=True)
class ActiveSchedule:
    """The number of layers trained at each step.

    Args:
        num_layers: ``L``.
        num_active: ``N_u``, the count outside the dense and ramp phases.
        dense_steps: steps at the start in which every layer trains.
        ramp_steps: steps after the dense ones in which the count falls linearly from
            ``L`` to ``N_u`` (rounded up, so it never goes below ``N_u``).
        rule: a ``step -> count`` rule instead (``dense_steps``/``ramp_steps`` are 0).
    """

    num_layers: int
    num_active: int
    dense_steps: int = 0
    ramp_steps: int = 0
    rule: ActiveRule | None = None

    @property
    def is_constant(self) -> bool:
        """Whether every step trains ``num_active`` layers (no dense, ramp or rule)."""
        return self.rule is None and self.dense_steps == 0 and self.ramp_steps == 0

    def count(self, step: int) -> int:
        """Layers to train in the step that follows ``step`` steps taken.

        Raises:
            ValueError: when ``rule`` returns something that is not a layer count or a
                fraction in (0, 1], naming the step and the value.
            TypeError: likewise, for a value that is not a number.
        """
        if self.rule is not None:
            return resolve_count(self.rule(step), self.num_layers, f"active_schedule({step})")
        if step < self.dense_steps:
            return self.num_layers
        into_ramp = step - self.dense_steps
        if into_ramp < self.ramp_steps:
            # ceil((n_l - n_u) * left / (ramp + 1)) in integers: a float product can land
            # a hair above an exact integer and round up one layer too many
            above = (self.num_layers - self.num_active) * (self.ramp_steps - into_ramp)
            return self.num_active - (-above // (self.ramp_steps + 1))
        return self.num_active
