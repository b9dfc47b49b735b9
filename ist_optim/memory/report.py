"""``memory_report``: what the optimizer state and the coming step hold, as
:meth:`ist_optim.ISTOptimizer.memory_report` returns it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .residency import StateResidency, state_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .budget import MemoryBudget

__all__ = ["memory_report"]


def memory_report(residency: StateResidency, trained: Sequence[torch.Tensor],
                  active: Sequence[int], budget: MemoryBudget | None) -> dict[str, Any]:
    """Bytes of optimizer state and of the trainable parameters of the active set (what
    :meth:`ist_optim.ISTOptimizer.memory_report` returns).

    Returns:
        ``state_bytes_on_device``: state held by the inner optimizer on the parameters'
        devices; ``state_bytes_offloaded``: state in host memory put there by
        ``state_policy="offload"``; ``active_trainable_bytes``: parameters trained in the
        coming step (``trained``: the ``active`` layers and the outside group); ``active_layers``;
        ``state_policy``; with a ``budget``: ``memory_budget`` (bytes),
        ``predicted_peak_bytes`` of the coming step and ``checkpointed_layers``, the blocks
        checkpointed in it (else None, None, []).
    """
    with residency.full_state() as inner:
        total = state_bytes(inner.state.values())
    offloaded = residency.offloaded_bytes()
    return {
        "state_bytes_on_device": total - offloaded,
        "state_bytes_offloaded": offloaded,
        "active_trainable_bytes": sum(p.numel() * p.element_size() for p in trained),
        "active_layers": list(active),
        "state_policy": residency.policy,
        **(budget.report() if budget is not None else
           {"memory_budget": None, "predicted_peak_bytes": None, "checkpointed_layers": []}),
    }
