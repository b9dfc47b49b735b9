"""``ist-finetune --compare``: the same data, steps and seed under three methods.

LoRA on all layers with plain AdamW, LoRA + IST, and LoRA + uniform layer sampling
(ISTOptimizer ``sampling="uniform"``, LISA-style), all with the adapter type of ``--peft``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .runner import MethodRun, MethodSpec, RunContext, run_method

__all__ = ["compare_specs", "run_compare"]


def compare_specs(peft: str, ist_kwargs: dict[str, Any], lr: float | None,
                  learning_rate: Callable[[str, str, float | None], float] | None = None
                  ) -> list[MethodSpec]:
    """The three methods of ``--compare``: ``peft`` on all layers with AdamW, IST with the
    run's keywords (``ist_kwargs``: the user's and the recipe's), and LISA-style uniform
    draws (no dense phase; the user's ``active_layers``, ``freeze_inactive``,
    ``suppression_mode`` and ``layers`` kept). Where the IST keywords are exactly the
    LISA-style ones, the IST row draws by importance instead, so the rows differ.

    ``learning_rate(peft, optimizer, lr)`` gives each method its rate (the recipe's,
    :meth:`ist_optim.cli.recipe.Recipe.learning_rate`); without it every method gets ``lr``
    (``None``: :data:`ist_optim.cli.runner.DEFAULT_LR`).

    Example:
        >>> [s.name for s in compare_specs("lora", {}, None)]
        ['lora (all layers, AdamW)', 'lora + IST', 'lora + uniform']
        >>> specs = compare_specs("lora", {"sampling": "uniform", "dense_steps": 5}, None)
        >>> [s.ist_kwargs for s in specs]
        [{}, {'sampling': 'uniform', 'dense_steps': 5}, {'sampling': 'uniform'}]
    """
    def rate(optimizer: str) -> float | None:
        return lr if learning_rate is None else learning_rate(peft, optimizer, lr)

    uniform = {k: v for k, v in ist_kwargs.items()
               if k in ("active_layers", "freeze_inactive", "suppression_mode", "layers")}
    uniform["sampling"] = "uniform"
    ist = dict(ist_kwargs)
    if ist == uniform:
        ist.pop("sampling")
    return [
        MethodSpec(f"{peft} (all layers, AdamW)", peft, "adamw", {}, rate("adamw")),
        MethodSpec(f"{peft} + IST", peft, "ist", ist, rate("ist")),
        MethodSpec(f"{peft} + uniform", peft, "ist", uniform, rate("ist")),
    ]


def run_compare(specs: list[MethodSpec], context: RunContext, *, steps: int, seed: int,
                on_run: Callable[[MethodRun], None] | None = None) -> list[MethodRun]:
    """Run each spec in turn; ``on_run`` sees each finished run (with its model), then the
    model is released before the next run starts."""
    runs = []
    for spec in specs:
        run = run_method(spec, context, steps=steps, seed=seed)
        if on_run is not None:
            on_run(run)
        run.model = None  # free the weights before the next run measures its peak
        runs.append(run)
    return runs
