"""The methods of the budget benchmark (``python -m benchmarks.budget``): how each one
fine-tunes inside the memory budget, and the learning rates swept for it.

A method is a peft method (``lora``, ``dora``, ``full``, or ``qlora``: LoRA on a 4-bit NF4
base), an optimizer kind of :func:`benchmarks.benchkit.models.build_optimizer` (``adamw``, ``ist``,
``badam``, and the gradient-projection optimizers ``galore``, ``apollo``, ``apollo-mini``),
how it fits the budget (``checkpointing``) and the ``ISTOptimizer`` keywords. Adding a
method = one entry of :data:`METHODS`; ``--methods NAME`` then runs it.

Two budgets: the main one, set by :data:`BASELINE` (``lora+gc``), and the QLoRA budget,
set the same way by :data:`QLORA_BASELINE` (``qlora+gc``), inside which the methods on a
4-bit base run (:func:`budget_of`) and with whose runs they are paired
(:func:`reference`).

Example:
    >>> METHODS["lora+ist-fo-da+budget"].ist_kwargs["estimator"]
    'first-order'
    >>> lr_grid("lisa+budget") == FULL_LR_GRID
    True
    >>> budget_of("qlora+ist+budget"), reference("qlora+ist+budget"), reference("qlora+gc")
    ('qlora+gc', 'qlora+gc', 'lora+gc')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The baseline every method is paired with: LoRA on every layer + gradient checkpointing.
BASELINE = "lora+gc"
#: The baseline of the methods on a 4-bit base: QLoRA (NF4 base + LoRA on every layer) with
#: gradient checkpointing; its peak plus the margin is the QLoRA budget.
QLORA_BASELINE = "qlora+gc"
#: The full-parameter peers IST with adapters is also compared with, seed by seed: the
#: layer-wise ones (LISA, BAdam) and the gradient-projection ones (GaLore, APOLLO), each
#: where it fits the budget.
PEERS = ("lisa+budget", "badam+gc", "galore+gc", "apollo+gc", "apollo-mini+gc")
#: Optimizer kinds that keep Adam's moments in a low-rank projection of each block matrix
#: (the planner's ``optimizer=`` names); their fit is measured (:func:`fit_check`).
PROJECTED = ("galore", "apollo", "apollo-mini")


@dataclass(frozen=True)
class Method:
    """A way to fine-tune inside the budget.

    ``checkpointing``: ``"model"`` (every block, the model's own gradient checkpointing),
    ``"budget"`` (``ISTOptimizer(memory_budget=...)``) or ``"none"`` (LoRA without
    checkpointing, run only to show that it does not fit the budget). ``peft="qlora"``:
    the base loaded in 4 bits (``ist_optim.cli.load_model(quantize="4bit")``), LoRA on
    it.
    """

    peft: str
    optimizer: str
    checkpointing: str
    ist_kwargs: dict[str, Any] = field(default_factory=dict)


FIRST_ORDER = {"estimator": "first-order", "sampling": "depth-aware"}
METHODS: dict[str, Method] = {
    "lora+gc": Method("lora", "adamw", "model"),
    "dora+gc": Method("dora", "adamw", "model"),
    # LoRA on every layer, every step, in ISTOptimizer: memory_budget then checkpoints only
    # the blocks needed to fit (the same updates as lora+gc; only memory and time differ).
    "lora+budget": Method("lora", "ist", "budget", {"active_layers": 1.0, "sampling": "uniform"}),
    "lora+ist+budget": Method("lora", "ist", "budget"),
    "lora+ist-fo-da+budget": Method("lora", "ist", "budget", FIRST_ORDER),
    "lora+uniform+budget": Method("lora", "ist", "budget", {"sampling": "uniform"}),
    # levers on lora+ist-fo-da+budget: prefer draws that fit (fewer checkpointed blocks),
    # twice and three times the active layers (more progress per step),
    "lora+ist-fo-da+budget+redraw4": Method("lora", "ist", "budget",
                                            {**FIRST_ORDER, "budget_redraws": 4}),
    "lora+ist-fo-da-50%+budget": Method("lora", "ist", "budget",
                                        {**FIRST_ORDER, "active_layers": 0.5}),
    "lora+ist-fo-da-75%+budget": Method("lora", "ist", "budget",
                                        {**FIRST_ORDER, "active_layers": 0.75}),
    # and a fresh optimizer state (Adam's bias correction restarts) each time a layer
    # becomes active, instead of its state kept from its last active step
    "lora+ist-fo-da+budget+drop": Method("lora", "ist", "budget",
                                         {**FIRST_ORDER, "state_policy": "drop"}),
    "full+ist-3+budget": Method("full", "ist", "budget",
                                {**FIRST_ORDER, "active_layers": 3, "state_policy": "drop"}),
    "full+ist-25%+budget": Method("full", "ist", "budget",
                                  {**FIRST_ORDER, "active_layers": 0.25,
                                   "state_policy": "drop"}),
    # the active-set schedule (issue 21): every layer for the first N steps, then IST's
    # draws (the dense steps checkpoint what the budget needs, like lora+budget)
    "lora+uniform-dense25+budget": Method("lora", "ist", "budget",
                                          {"sampling": "uniform", "dense_steps": 25}),
    "lora+uniform-dense50+budget": Method("lora", "ist", "budget",
                                          {"sampling": "uniform", "dense_steps": 50}),
    "lora+uniform-dense100+budget": Method("lora", "ist", "budget",
                                           {"sampling": "uniform", "dense_steps": 100}),
    "lora+ist-fo-da-dense50+budget": Method("lora", "ist", "budget",
                                            {**FIRST_ORDER, "dense_steps": 50}),
    "lora+uniform-ramp100+budget": Method("lora", "ist", "budget",
                                          {"sampling": "uniform", "ramp_steps": 100}),
    # LISA-style: 2 uniformly drawn blocks of full fine-tuning per step, no importance.
    "lisa+budget": Method("full", "ist", "budget",
                          {"sampling": "uniform", "active_layers": 2, "state_policy": "drop"}),
    "badam+gc": Method("full", "badam", "model"),
    # full fine-tuning of the blocks with gradient projection (issue 24): GaLoreAdamW /
    # APOLLOAdamW on the blocks' 2-D weights (the HF Trainer's defaults: rank 128, APOLLO-Mini
    # rank 1), plain AdamW steps for the rest (the norms); run where the measured peak fits
    # the budget, else recorded with the planner's figure
    "galore+gc": Method("full", "galore", "model"),
    "apollo+gc": Method("full", "apollo", "model"),
    "apollo-mini+gc": Method("full", "apollo-mini", "model"),
    # QLoRA (issue 24): the 4-bit NF4 base of `ist-finetune --quantize 4bit`, LoRA on every
    # linear layer; the baseline with the model's checkpointing sets the QLoRA budget, IST
    # (uniform draws, as lora+uniform+budget) runs inside it under memory_budget
    "qlora+gc": Method("qlora", "adamw", "model"),
    "qlora+ist+budget": Method("qlora", "ist", "budget", {"sampling": "uniform"}),
    "qlora+uniform-dense50+budget": Method("qlora", "ist", "budget",
                                           {"sampling": "uniform", "dense_steps": 50}),
}
LR_GRID = (5e-4, 1e-3, 2e-3, 4e-3)
# Full fine-tuning diverges at adapter rates (the few-data benchmark chose 1e-4): its grid is
# shifted down by the same factors.
FULL_LR_GRID = (1e-4, 2e-4, 5e-4, 1e-3)


def lr_grid(name: str) -> tuple[float, ...]:
    """The rates swept for method ``name``."""
    return FULL_LR_GRID if METHODS[name].peft == "full" else LR_GRID


def budget_of(name: str) -> str:
    """The baseline whose peak (plus the margin) is the budget method ``name`` runs in:
    :data:`QLORA_BASELINE` for a method on a 4-bit base, else :data:`BASELINE` (a name no
    longer in :data:`METHODS`, from the rows of an older run: by its ``qlora+`` prefix)."""
    method = METHODS.get(name)
    qlora = method.peft == "qlora" if method is not None else name.startswith("qlora+")
    return QLORA_BASELINE if qlora else BASELINE


def reference(name: str) -> str | None:
    """The run method ``name`` is paired with, seed by seed: the baseline of its budget;
    ``qlora+gc`` with ``lora+gc`` (what the 4-bit base costs); None for ``lora+gc``; a name
    no longer in :data:`METHODS` (rows of an older run) with ``lora+gc``."""
    if name == BASELINE:
        return None
    if name == QLORA_BASELINE or name not in METHODS:
        return BASELINE
    return budget_of(name)


def fit_check(name: str) -> str | None:
    """How a method's fit is checked before it runs: ``"plan"`` (IST under
    ``memory_budget``: its easiest step planned), ``"measure"`` (a gradient-projection
    optimizer: two accounted steps, the planner's figure beside them), None (run as it is).
    """
    method = METHODS[name]
    if method.checkpointing == "budget":
        return "plan"
    return "measure" if method.optimizer in PROJECTED else None
