"""The methods of the frontier: each a way to fit one budget, and the budget study's
curve whose loss per step it shares.

* ``lora+gc``: LoRA on every layer, the model's gradient checkpointing on every block;
* ``lora``: the same without checkpointing (only where its peak fits);
* ``lora+budget``: ``ISTOptimizer`` with every layer active and ``memory_budget``: per
  step only the blocks the planner says the budget needs are checkpointed;
* ``lora+every-k``: the manual "selective" recipe, every k-th block checkpointed (blocks
  0, k, 2k, ...), with the largest k whose planned peak fits the budget (no headroom: a
  user would try k until one fits); switched per block with the library's
  :class:`ist_optim.BlockCheckpointer` (transformers' own per-layer switch underneath);
* ``ist-sparse+budget``: the sparse phase of ``ist-finetune``'s default recipe, the budget
  study's best IST configuration ``lora+uniform-dense100+budget`` (every layer for the
  first 100 of 200 steps, then uniform draws of 7 of 30 layers): its dense steps are
  ``lora+budget``'s steps exactly (every layer active under the same budget, the same
  decision), so only its sparse steps are timed (``lora+uniform+budget``) and the run's
  clock is 100 steps of one and 100 of the other (:func:`phase_steps`);
* ``apollo-mini+gc``: full fine-tuning of the blocks with APOLLO-Mini, checkpointing on
  every block; ``apollo-mini+budget``: the same optimizer inside ``ISTOptimizer`` with every
  layer active and ``memory_budget`` (planned with ``optimizer="apollo-mini"``).

Loss per step does not depend on the budget where the updates are the same: every LoRA
method here makes ``lora+gc``'s updates (tested for ``lora+budget``; checkpointing never
changes them), ``apollo-mini+budget`` ``apollo-mini+gc``'s (its projector seeds are the
parameter indices, the same in both), so :data:`CURVE_OF` names the budget study's runs
whose per-step held-out losses each method has.

Example:
    >>> CURVE_OF["lora+budget"], phase_steps("ist-sparse+budget", 200)
    ('lora+gc', {'lora+budget': 100, 'ist-sparse+budget': 100})
    >>> every_kth(30, 8)
    [0, 8, 16, 24]
"""

from __future__ import annotations

from typing import Any

from ..budget.methods import METHODS as STUDY_METHODS

#: The timed methods, in the report's order.
NAMES = ("lora+gc", "lora", "lora+budget", "lora+every-k", "ist-sparse+budget",
         "apollo-mini+gc", "apollo-mini+budget")
#: The baseline every step time is a ratio to.
BASELINE = "lora+gc"
#: The budget study's method whose per-step curves (linear schedule, 3 seeds) each timed
#: method shares.
CURVE_OF = {"lora+gc": "lora+gc", "lora": "lora+gc", "lora+budget": "lora+gc",
            "lora+every-k": "lora+gc", "ist-sparse+budget": "lora+uniform-dense100+budget",
            "apollo-mini+gc": "apollo-mini+gc", "apollo-mini+budget": "apollo-mini+gc"}
#: The budget study's method each timed one is built as (``ist-sparse+budget``: the
#: sparse phase, uniform draws; ``lora+every-k``: LoRA without checkpointing, then the
#: blocks switched; ``apollo-mini+budget`` is built in :mod:`.run`).
BUILT_AS = {"lora+gc": "lora+gc", "lora+budget": "lora+budget",
            "ist-sparse+budget": "lora+uniform+budget", "apollo-mini+gc": "apollo-mini+gc"}
#: The chosen rates of the budget study (linear schedule), so a timed step is a real one.
LR = {"lora+gc": 2e-3, "lora": 2e-3, "lora+budget": 2e-3, "lora+every-k": 2e-3,
      "ist-sparse+budget": 4e-3, "apollo-mini+gc": 1e-3, "apollo-mini+budget": 1e-3}
#: Methods whose blocks ``ISTOptimizer(memory_budget=...)`` picks per step.
BUDGETED = ("lora+budget", "ist-sparse+budget", "apollo-mini+budget")


def dense_steps() -> int:
    """The dense phase of the IST recipe timed (``lora+uniform-dense100+budget``)."""
    return int(STUDY_METHODS[CURVE_OF["ist-sparse+budget"]].ist_kwargs["dense_steps"])


def phase_steps(name: str, steps: int) -> dict[str, int]:
    """Of a run of ``steps`` steps of ``name``'s curve, how many steps take the time of each
    timed method: the IST recipe's dense phase is ``lora+budget``'s steps."""
    if name != "ist-sparse+budget":
        return {name: steps}
    dense = min(dense_steps(), steps)
    return {"lora+budget": dense, name: steps - dense}


def every_kth(layers: int, k: int) -> list[int]:
    """The blocks ``lora+every-k`` checkpoints: 0, k, 2k, ... below ``layers``."""
    if k < 1:
        raise ValueError(f"Invalid k: {k}; expected an integer >= 1")
    return list(range(0, layers, k))


def study_method(name: str) -> Any:
    """The budget study's :class:`~benchmarks.budget.methods.Method` ``name`` is built as."""
    return STUDY_METHODS[BUILT_AS[name]]
