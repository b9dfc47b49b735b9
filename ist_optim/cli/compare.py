"""``ist-finetune --compare``: the same data, steps and seed under three methods.

LoRA on all layers with plain AdamW, LoRA + IST, and LoRA + uniform layer sampling
(ISTOptimizer ``sampling="uniform"``, LISA-style), all with the adapter type of ``--peft``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .runner import MethodRun, MethodSpec, RunContext, run_method

__all__ = ["compare_specs", "run_compare"]


def compare_specs(peft: str, ist_kwargs: dict[str, Any], lr: float | None) -> list[MethodSpec]:
    """The three methods of ``--compare`` (the user's IST options apply to both IST runs).

    Example:
        >>> [s.name for s in compare_specs("lora", {}, None)]
        ['lora (all layers, AdamW)', 'lora + IST', 'lora + uniform']
    """
    uniform = {k: v for k, v in ist_kwargs.items()
               if k in ("active_layers", "freeze_inactive", "suppression_mode", "layers")}
    uniform["sampling"] = "uniform"
    ist = dict(ist_kwargs)
    if ist.get("sampling") == "uniform":
        ist.pop("sampling")
    return [
        MethodSpec(f"{peft} (all layers, AdamW)", peft, "adamw", {}, lr),
        MethodSpec(f"{peft} + IST", peft, "ist", ist, lr),
        MethodSpec(f"{peft} + uniform", peft, "ist", uniform, lr),
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
