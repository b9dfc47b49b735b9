"""What ``ist-finetune`` fills in where the user set nothing: the measured recipe or the paper's.

The default (``measured``) is the best IST configuration of ``python -m benchmarks.budget`` under a
user's schedule (docs/benchmarks.md, "Inside the budget under a user's schedule"): the HF
Trainer's linear schedule with 10% warm-up, every layer active for the first half of the
steps (``dense_steps``), then uniform draws of ``active_layers``, and the rates chosen there
on validation (LoRA + IST 4e-3, LoRA on all layers 2e-3). ``--paper`` restores the paper's
settings, which are also the library's defaults: importance sampling from the first step,
a constant rate without warm-up, 1e-3 for adapters.

A flag the user sets always wins over either recipe; the recipe only fills the ones left
unset (``None`` after parsing).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .runner import DEFAULT_LR

__all__ = ["DENSE_FRACTION", "MEASURED_LR", "RECIPE_DEFAULTS", "WARMUP_FRACTION", "Recipe",
           "apply_recipe"]

#: Share of ``--steps`` with every layer active: N = 100 of 200 steps was chosen on the
#: validation plays from {25, 50, 100} dense steps and a 100-step ramp.
DENSE_FRACTION = 0.5
#: Share of ``--steps`` of linear warm-up (the HF Trainer's usual ``warmup_ratio=0.1``).
WARMUP_FRACTION = 0.1
#: Rates chosen on the validation plays at the full length (LoRA r8 on every linear layer
#: of SmolLM2-135M, 200 steps of 4 x 128 tokens, linear schedule); DoRA + GC chose LoRA's.
MEASURED_LR: dict[tuple[str, str], float] = {
    ("lora", "ist"): 4e-3, ("dora", "ist"): 4e-3,
    ("lora", "adamw"): 2e-3, ("dora", "adamw"): 2e-3,
}

#: What the measured recipe gives the IST flags it fills (markdown; ``--help`` and
#: docs/cli.md show it): exactly the IST flags :func:`apply_recipe` sets.
RECIPE_DEFAULTS: dict[str, str] = {
    "sampling": "`uniform`; with `--paper` the library's",
    "dense_steps": f"{DENSE_FRACTION:.0%} of `--steps` (not where `--ist-kwarg` sets "
                   "`dense_steps` or `ramp_steps`); with `--paper` the library's",
}


@dataclass(frozen=True)
class Recipe:
    """The settings a run gets for the flags it left unset.

    Example:
        >>> from ist_optim.cli.parser import parse_args
        >>> args = parse_args(["--steps", "200"])
        >>> recipe = apply_recipe(args)
        >>> (args.lr_schedule, args.warmup_steps, args.sampling, args.dense_steps)
        ('linear', 20, 'uniform', 100)
        >>> recipe.learning_rate("lora", "ist", None), recipe.learning_rate("lora", "adamw", None)
        (0.004, 0.002)
        >>> args = parse_args(["--steps", "200", "--paper"])
        >>> recipe = apply_recipe(args)
        >>> (args.lr_schedule, args.warmup_steps, args.sampling, args.dense_steps)
        ('constant', 0, None, None)
        >>> recipe.learning_rate("lora", "ist", None), recipe.learning_rate("lora", "ist", 3e-4)
        (0.001, 0.0003)
    """

    paper: bool

    @property
    def name(self) -> str:
        return "paper" if self.paper else "measured"

    def learning_rate(self, peft: str, optimizer: str, lr: float | None) -> float:
        """``lr`` if the user set one, else this recipe's rate for the method."""
        if lr is not None:
            return lr
        if not self.paper and (peft, optimizer) in MEASURED_LR:
            return MEASURED_LR[peft, optimizer]
        return DEFAULT_LR.get(peft, 1e-3)


def apply_recipe(args: argparse.Namespace) -> Recipe:
    """Fill the unset schedule and IST flags of ``args`` in place from its recipe.

    Sets ``lr_schedule`` and ``warmup_steps`` (10% of the steps before a decaying schedule
    of the measured recipe, else none); with ``--optimizer ist`` also ``sampling``
    and ``dense_steps`` (not where ``--ist-kwarg`` sets ``dense_steps``, ``ramp_steps`` or
    ``sampling``: the user's schedule stands as given). The rate stays unset in ``args``
    (``--compare`` runs methods with different rates): ask :meth:`Recipe.learning_rate`.
    Idempotent: applying it twice changes nothing more.
    """
    recipe = Recipe(paper=bool(getattr(args, "paper", False)))
    if args.lr_schedule is None:
        args.lr_schedule = "constant" if recipe.paper else "linear"
    if args.warmup_steps is None:
        decays = args.lr_schedule != "constant" and not recipe.paper
        args.warmup_steps = round(WARMUP_FRACTION * args.steps) if decays else 0
    given = {key for key, _value in args.ist_kwarg}
    if recipe.paper or args.optimizer != "ist":
        return recipe
    if args.sampling is None and "sampling" not in given:
        args.sampling = "uniform"
    if args.dense_steps is None and not given & {"dense_steps", "ramp_steps"}:
        args.dense_steps = round(DENSE_FRACTION * args.steps)
    return recipe
