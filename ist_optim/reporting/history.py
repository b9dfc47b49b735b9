"""Recording what IST did over training: active layers and importance per step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..optimizer import ISTOptimizer

__all__ = ["ImportanceHistory"]


@dataclass
class ImportanceHistory:
    """Per-step record of the trained layers and the importance, for logs and plots.

    Call :meth:`record` after each ``opt.step()``; it stores the layers that *were*
    trained in that step (the active set before the step) and the importance after it.

    Example:
        >>> import torch
        >>> from ist_optim import ISTOptimizer, ImportanceHistory
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
        >>> opt = ISTOptimizer(torch.optim.SGD, torch.nn.Sequential(*blocks), lr=0.1,
        ...                    layers=list(blocks), sampling="uniform", seed=0)
        >>> history = ImportanceHistory(num_layers=opt.num_layers)
        >>> trained = opt.active_layers
        >>> opt.step()
        >>> history.record(opt, trained)
        >>> history.train_counts().sum().item()
        1
    """

    num_layers: int
    steps: list[int] = field(default_factory=list)
    importance: list[list[float]] = field(default_factory=list)
    trained: list[list[int]] = field(default_factory=list)

    def record(self, opt: ISTOptimizer, trained_layers: list[int] | None = None) -> None:
        """Append the optimizer's current importance and the layers trained this step.

        Args:
            opt: the optimizer, right after ``step()``.
            trained_layers: the layers that were active during that step (read
                ``opt.active_layers`` *before* ``step()``); ``None`` records none.
        """
        if opt.num_layers != self.num_layers:
            raise ValueError(
                f"history is for {self.num_layers} layers, the optimizer has {opt.num_layers}"
            )
        self.steps.append(opt.num_steps)
        self.importance.append(opt.importance.tolist())
        self.trained.append(list(trained_layers or []))

    def importance_matrix(self) -> torch.Tensor:
        """Importance as a ``(num_records, num_layers)`` tensor."""
        if not self.importance:
            return torch.zeros(0, self.num_layers)
        return torch.tensor(self.importance, dtype=torch.float32)

    def train_counts(self) -> torch.Tensor:
        """How many recorded steps trained each layer."""
        counts = torch.zeros(self.num_layers, dtype=torch.long)
        for layers in self.trained:
            counts[list(layers)] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "steps": list(self.steps),
                "importance": [list(r) for r in self.importance],
                "trained": [list(t) for t in self.trained]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImportanceHistory:
        return cls(int(data["num_layers"]), list(data["steps"]),
                   [list(r) for r in data["importance"]], [list(t) for t in data["trained"]])
