"""ist_optim: Importance-aware Sparse Tuning (IST) as a drop-in PyTorch optimizer.

Replace one line of a training script::

    opt = ISTOptimizer(torch.optim.AdamW, model, lr=2e-4)

See README.md for how it works and what it measures.
"""

from .groups import LayerGroups, build_layer_groups, discover_layers
from .history import ImportanceHistory
from .importance import paper_advantages, score_update
from .optimizer import ISTOptimizer
from .plotting import plot_importance
from .sampling import resolve_count, sample_candidate_sets, sample_layers, sampling_weights
from .suppression import Suppressor, find_tuner_layers

__version__ = "0.1.0"

__all__ = [
    "ISTOptimizer",
    "ImportanceHistory",
    "LayerGroups",
    "Suppressor",
    "build_layer_groups",
    "discover_layers",
    "find_tuner_layers",
    "paper_advantages",
    "plot_importance",
    "resolve_count",
    "sample_candidate_sets",
    "sample_layers",
    "sampling_weights",
    "score_update",
]
