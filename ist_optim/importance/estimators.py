"""The built-in estimators, by the names this module had when it held their math.

Each estimator is one module with its math and its round: :mod:`.paper`,
:mod:`.normalized`, :mod:`.first_order` (docs/extending.md adds one). This module only
re-exports them, so ``from ist_optim.importance.estimators import ...`` keeps working.
"""

from .first_order import FirstOrderProbe, FirstOrderRound, predicted_suppression_deltas
from .normalized import (
    ADVANTAGE_SCALE,
    SCORE_RETENTION,
    NormalizedRound,
    RunningScale,
    normalized_advantages,
    normalized_score_update,
)
from .paper import PaperRound, paper_advantages

__all__ = [
    "ADVANTAGE_SCALE",
    "SCORE_RETENTION",
    "FirstOrderProbe",
    "FirstOrderRound",
    "NormalizedRound",
    "PaperRound",
    "RunningScale",
    "normalized_advantages",
    "normalized_score_update",
    "paper_advantages",
    "predicted_suppression_deltas",
]
