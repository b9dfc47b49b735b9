"""``ReplacedParams``: notices when a wrapper swapped the inner optimizer's parameters.

accelerate prepares a model and its optimizer together under FSDP2
(``Accelerator._prepare_fsdp2``): it shards the model (``fully_shard`` gives every block new
DTensor parameters) and then puts each shard in the optimizer's ``param_groups`` in place
of the parameter it came from, position for position. The HF Trainer builds its optimizer
before that (``create_optimizer``, then ``accelerator.prepare(model, optimizer)``), so do
TRL, axolotl and LLaMA-Factory on top of it. An ``ISTOptimizer`` built there has its
layers made of the parameters the model no longer uses; :meth:`ReplacedParams.check`
finds the swap, position for position, so the optimizer can follow it before its first
update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["ReplacedParams"]


def _flat(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class ReplacedParams:
    """The parameters of ``optimizer``'s ``param_groups`` as last seen, and what replaced
    them since.

    Args:
        optimizer: the inner optimizer.

    Example:
        >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([a, b], lr=0.1)
        >>> seen = ReplacedParams(opt)
        >>> seen.check()
        {}
        >>> shard = torch.nn.Parameter(torch.ones(1))
        >>> opt.param_groups[0]["params"][1] = shard   # what accelerate's FSDP2 prepare does
        >>> seen.check() == {id(b): shard}
        True
        >>> seen.mark_seen(); seen.check()
        {}
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self._seen = _flat(optimizer)

    def check(self) -> dict[int, Any]:
        """``id(old parameter) -> new parameter`` for every position of ``param_groups``
        that holds another parameter than when last seen (empty when none). They stay
        unseen until :meth:`mark_seen`, so a caller that fails to follow them finds them
        again.

        Raises:
            RuntimeError: when parameters were added or removed other than through
                ``ISTOptimizer.add_param_group``, or when the inner optimizer has state for
                a replaced parameter (the swap came after training began).
        """
        now = _flat(self.optimizer)
        if len(now) != len(self._seen):
            raise RuntimeError(
                f"the inner optimizer holds {len(now)} parameters, {len(self._seen)} when "
                "ISTOptimizer last saw it: add parameters with ISTOptimizer.add_param_group, "
                "not on the inner optimizer")
        replaced = {id(old): new for old, new in zip(self._seen, now, strict=True)
                    if old is not new}
        if not replaced:
            return {}
        trained = sum(old in self.optimizer.state for old in self._seen
                      if id(old) in replaced)
        if trained:
            raise RuntimeError(
                f"{len(replaced)} parameters of the inner optimizer were replaced after it "
                f"had state for {trained} of them; IST follows a swap (accelerate's FSDP2 "
                "prepare) only before the first step: prepare the model before training")
        return replaced

    def mark_seen(self) -> None:
        """The optimizer's parameters as they are now are the ones followed."""
        self._seen = _flat(self.optimizer)
