"""``LayerActivator``: makes a set of layers the trained ones.

It applies the set the sampler owns (:attr:`ist_optim.LayerSampler.active`) and keeps
only what it applied, to know what changed. When the active set changes it moves the
optimizer state of the layers that leave and come back (:class:`ist_optim.StateResidency`),
sets ``requires_grad`` (so backward computes no weight gradient for inactive layers),
moves the backward cut
(:class:`ist_optim.BackwardCut`) to the lowest active layer, tells ``memory_budget``
(:class:`ist_optim.MemoryBudget`) which blocks to checkpoint for the set, keeps gradients
of inactive layers out of the update, and undoes all of it in :meth:`close`.

Under ``torch.distributed`` the freeze of the first step is deferred: a DDP wrapper built
after the optimizer must see every trainable parameter require grad once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from .backward import BackwardCut
from .groups import LayerGroups

if TYPE_CHECKING:  # pragma: no cover  (the parts are passed in; core imports no memory/)
    from ..memory.budget import MemoryBudget
    from ..memory.residency import StateResidency

__all__ = ["LayerActivator"]


class LayerActivator:
    """Applies an active set to the model and the optimizer state.

    Args:
        layers: the layer groups (blocks and their trainable parameters).
        residency: moves the inner optimizer's state of layers that leave and return.
        freeze_inactive: set ``requires_grad=False`` on inactive layers.
        cut_backward: cut the graph at the input of the lowest active layer.
        defer_first_freeze: keep every layer's ``requires_grad`` until
            :meth:`end_deferral` (distributed runs, for the DDP wrapper).
        budget: the ``memory_budget`` policy, applied after each set (it picks the blocks
            to checkpoint); closed with the activator.
        model: the model of the layers, for the cut (see :class:`ist_optim.BackwardCut`).

    Example:
        >>> import torch
        >>> from ist_optim import StateResidency, build_layer_groups
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
        >>> groups = build_layer_groups(blocks, list(blocks.parameters()), list(blocks))
        >>> residency = StateResidency(torch.optim.SGD(blocks.parameters(), lr=0.1), "keep")
        >>> act = LayerActivator(groups, residency, freeze_inactive=True, cut_backward=False)
        >>> act.apply([1]); [b.weight.requires_grad for b in blocks]
        [False, True, False]
        >>> act.close(); [b.weight.requires_grad for b in blocks]
        [True, True, True]
    """

    def __init__(self, layers: LayerGroups, residency: StateResidency, *,
                 freeze_inactive: bool, cut_backward: bool, defer_first_freeze: bool = False,
                 budget: MemoryBudget | None = None, model: nn.Module | None = None):
        self.layers = layers
        self.budget = budget
        self.freeze_inactive = freeze_inactive
        self.residency = residency
        self.backward_cut = (BackwardCut(layers.modules, model=model) if cut_backward
                             else None)
        self.applied: list[int] = []
        self._deferred = defer_first_freeze
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def freezes_now(self) -> bool:
        """Whether inactive layers get ``requires_grad=False`` (not during a deferred step)."""
        return self.freeze_inactive and not self._deferred

    def apply(self, active: Sequence[int]) -> None:
        """Make ``active`` the trained layers: state residency, cut, ``requires_grad``
        (of every registered parameter, so parameters added since are covered too), then
        the budget's checkpointing.

        :attr:`applied` is updated after each layer's state has moved, so an exception or
        a ``KeyboardInterrupt`` in the middle leaves it naming exactly the layers whose
        state the optimizer holds, and the next :meth:`apply` finishes the switch.
        """
        new = set(active)
        for index in sorted(set(self.applied) - new):
            self.residency.deactivate(self.layers.params[index])
            self.applied = [i for i in self.applied if i != index]
        for index in sorted(new - set(self.applied)):
            self.residency.activate(self.layers.params[index])
            self.applied = sorted({*self.applied, index})
        if self.backward_cut is not None:
            self.backward_cut.set_active(self.applied)
        if self.freezes_now:
            for index, params in enumerate(self.layers.params):
                for p in params:
                    p.requires_grad_(index in new)
        if self.budget is not None:
            self.budget.apply(list(active))

    def reset(self) -> None:
        """Forget offloaded state and treat every layer as applied (a checkpoint load just
        put every saved entry into the optimizer); :meth:`apply` follows."""
        self.residency.clear()
        self.applied = list(range(self.layers.num_layers))

    def load_state(self, load: Callable[[list[torch.Tensor] | None], None],
                   active: Sequence[int]) -> None:
        """Put a checkpoint's optimizer state in place and apply ``active``.

        ``load(params)`` loads the saved state of ``params`` alone into the inner optimizer,
        replacing what it holds (``None``: all of it). With ``"offload"`` each inactive
        layer's state is loaded and offloaded in turn, the host waiting for its copy before
        the next one comes, then the active layers' and the outside group's: the device
        never holds more than the active layers' state and one other layer's (loading all
        of it at once would not fit where offloading is what makes training fit). With
        ``"drop"`` the inactive layers' saved state is not loaded; with ``"keep"`` all of
        it is, at once.
        """
        residency = self.residency
        residency.clear()
        self.applied = []
        new = set(active)
        if residency.policy == "keep":
            load(None)
            self.applied = list(range(self.layers.num_layers))
        else:
            if residency.policy == "offload":
                for index in range(self.layers.num_layers):
                    if index not in new:
                        load(self.layers.params[index])
                        residency.deactivate(self.layers.params[index])
                        residency.synchronize()
            load(self.layers.trained_params(sorted(new)))
            self.applied = sorted(new)
        self.apply(active)

    def end_deferral(self) -> None:
        self._deferred = False

    @contextmanager
    def update_only_active(self) -> Iterator[None]:
        """Keep the gradients of inactive layers out of the optimizer update.

        Inside the context they are ``None`` (call :meth:`hold_inactive_grads` again after
        a closure's backward); on exit they are put back as they were (``zero_grad``
        clears them as usual), so code that reads every gradient after ``step()``
        (AdaLoRA's rank allocator) still finds them.
        """
        self._held = {}
        self.hold_inactive_grads()
        try:
            yield
        finally:
            held, self._held = self._held, {}
            for p, grad in held.values():
                if p.grad is None:
                    p.grad = grad

    def hold_inactive_grads(self) -> None:
        """Take the current gradients of inactive layers out (inside :meth:`update_only_active`)."""
        active = set(self.applied)
        for index, params in enumerate(self.layers.params):
            if index in active:
                continue
            for p in params:
                if p.grad is not None:
                    self._held[id(p)] = (p, p.grad)
                    p.grad = None

    def trained_grads(self) -> list[torch.Tensor]:
        """The gradients the coming update would apply: those of the applied layers and of
        the outside group (parameters without a gradient left out)."""
        params = self.layers.trained_params(self.applied)
        return [p.grad for p in params if p.grad is not None]

    def grad_norms(self) -> dict[int, float]:
        """L2 norm of each applied layer's gradient (layers without one left out); one
        device sync."""
        norms = {i: [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
                     for p in self.layers.params[i] if p.grad is not None]
                 for i in self.applied}
        layers = [i for i, n in norms.items() if n]
        if not layers:
            return {}
        per_layer = [torch.linalg.vector_norm(torch.stack(norms[i])) for i in layers]
        device = per_layer[0].device
        values = torch.stack([v.to(device) for v in per_layer]).tolist()
        return dict(zip(layers, values, strict=True))

    def wait(self) -> None:
        """Make the update wait for state copies in flight."""
        self.residency.wait()

    def close(self) -> None:
        """Remove the cut, re-enable every layer's grads and close the budget (the blocks
        get their own checkpointing back)."""
        if self.backward_cut is not None:
            self.backward_cut.remove()
            self.backward_cut = None
        if self.freeze_inactive:
            for params in self.layers.params:
                for p in params:
                    p.requires_grad_(True)
        if self.budget is not None:
            self.budget.close()
