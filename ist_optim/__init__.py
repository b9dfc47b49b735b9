"""ist_optim: Importance-aware Sparse Tuning (IST) as a drop-in PyTorch optimizer.

Replace one line of a training script::

    opt = ISTOptimizer(torch.optim.AdamW, model, lr=2e-4)

See README.md for how it works and what it measures.
"""

from .config import ISTConfig
from .core.activator import LayerActivator
from .core.backward import BackwardCut, GraphMemo, reaches_trainable_parameter
from .core.compile import compile_blocks, is_compiled_block
from .core.groups import LayerGroups, build_layer_groups, discover_layers
from .core.recompute import BlockCheckpointer
from .importance.first_order import FirstOrderProbe, FirstOrderRound
from .importance.normalized import NormalizedRound, normalized_score_update
from .importance.paper import PaperRound, paper_advantages
from .importance.rounds import ImportanceRound, RoundContext
from .importance.scores import score_update
from .importance.suppression import Suppressor, find_tuner_layers
from .memory.budget import BudgetDecision, CheckpointPolicy, MemoryBudget, parse_memory_budget
from .memory.residency import StateResidency, state_bytes
from .optimizer import ISTOptimizer
from .planner import (
    Device,
    MemoryEstimate,
    MemoryPlanner,
    StepAccount,
    StepTime,
    account_step,
    estimate_peak_memory,
    estimate_step_time,
)
from .registry import register_estimator, register_sampling_rule
from .reporting.history import ImportanceHistory
from .reporting.plotting import plot_importance
from .sampling.draws import (
    distribution_spread,
    resolve_count,
    sample_candidate_sets,
    sample_depth_aware,
    sample_layers,
    sampling_weights,
)
from .sampling.rules import SamplingRule
from .sampling.sampler import LayerSampler
from .sampling.schedule import ActiveSchedule

__version__ = "0.1.0"

__all__ = [
    "ActiveSchedule",
    "BackwardCut",
    "BlockCheckpointer",
    "BudgetDecision",
    "CheckpointPolicy",
    "Device",
    "FirstOrderProbe",
    "FirstOrderRound",
    "GraphMemo",
    "ISTConfig",
    "ISTOptimizer",
    "ImportanceHistory",
    "ImportanceRound",
    "LayerActivator",
    "LayerGroups",
    "LayerSampler",
    "NormalizedRound",
    "PaperRound",
    "RoundContext",
    "SamplingRule",
    "MemoryBudget",
    "MemoryEstimate",
    "MemoryPlanner",
    "StateResidency",
    "StepAccount",
    "StepTime",
    "Suppressor",
    "account_step",
    "build_layer_groups",
    "compile_blocks",
    "discover_layers",
    "distribution_spread",
    "estimate_peak_memory",
    "estimate_step_time",
    "find_tuner_layers",
    "is_compiled_block",
    "normalized_score_update",
    "paper_advantages",
    "parse_memory_budget",
    "plot_importance",
    "register_estimator",
    "register_sampling_rule",
    "reaches_trainable_parameter",
    "resolve_count",
    "sample_candidate_sets",
    "sample_depth_aware",
    "sample_layers",
    "sampling_weights",
    "score_update",
    "state_bytes",
]
