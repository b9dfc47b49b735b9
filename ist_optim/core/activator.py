"""``LayerActivator``: makes a set of layers the trained ones, and is the one record of it.

:meth:`LayerActivator.apply` is the commit point of the active set: the optimizer hands it
the set the sampler drew (or the user chose), and :attr:`LayerActivator.active` names it
once it is in place; nothing else keeps a copy. When the active set changes it moves the
optimizer state of the layers that leave and come back (:class:`ist_optim.StateResidency`),
sets ``requires_grad`` (so backward computes no weight gradient for inactive layers),
moves the backward cut (:class:`ist_optim.BackwardCut`) to the lowest active layer, tells
``memory_budget`` (:class:`ist_optim.MemoryBudget`) which blocks to checkpoint for the
set, keeps gradients of inactive layers out of the update, and undoes all of it in
:meth:`close`.

A switch interrupted in the middle (an exception, a ``KeyboardInterrupt``) leaves
:attr:`~LayerActivator.active` naming the set that trained before, and
:meth:`~LayerActivator.finish_switch` puts that set back in place before the next step.

Under ``torch.distributed`` the freeze of the first step is deferred: a DDP wrapper built
after the optimizer must see every trainable parameter require grad once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .backward import BackwardCut
from .groups import LayerGroups, check_layer_indices

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
        self._active: list[int] = []  # the committed set: it trains in the coming step
        self._switched_in: list[int] = []  # the layers whose state the residency holds
        self._complete = True  # whether everything of apply(_active) is in place
        self._deferred = defer_first_freeze
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def active(self) -> list[int]:
        """Sorted indices of the layers that train in the coming step (the last set
        :meth:`apply` completed, or a loaded checkpoint's)."""
        return list(self._active)

    @property
    def switched_in(self) -> list[int]:
        """The layers whose optimizer state the residency has switched in: :attr:`active`,
        except after a switch was interrupted in the middle (until :meth:`finish_switch`)."""
        return list(self._switched_in)

    @property
    def freezes_now(self) -> bool:
        """Whether inactive layers get ``requires_grad=False`` (not during a deferred step)."""
        return self.freeze_inactive and not self._deferred

    def apply(self, active: Iterable[int]) -> None:
        """Make ``active`` the trained layers, and record it as :attr:`active` once it is
        in place: state residency, cut, ``requires_grad`` (of every registered parameter,
        so parameters added since are covered too), then the budget's checkpointing.

        :attr:`switched_in` is updated after each layer's state has moved, so an exception
        or a ``KeyboardInterrupt`` in the middle leaves it naming exactly the layers whose
        state the optimizer holds, :attr:`active` naming the set before, and
        :meth:`finish_switch` puts that set back.

        Raises:
            ValueError: for indices that are not distinct layers (nothing changes).
        """
        new_list = check_layer_indices(active, self.layers.num_layers)
        new = set(new_list)
        self._complete = False
        for index in sorted(set(self._switched_in) - new):
            self.residency.deactivate(self.layers.params[index])
            self._switched_in = [i for i in self._switched_in if i != index]
        for index in sorted(new - set(self._switched_in)):
            self.residency.activate(self.layers.params[index])
            self._switched_in = sorted({*self._switched_in, index})
        if self.backward_cut is not None:
            self.backward_cut.set_active(self._switched_in)
        if self.freezes_now:
            for index, params in enumerate(self.layers.params):
                for p in params:
                    p.requires_grad_(index in new)
        if self.budget is not None:
            self.budget.apply(new_list)
        self._active = new_list
        self._complete = True

    def finish_switch(self) -> None:
        """Put :attr:`active` back in place if a switch was interrupted since it was
        applied (or a checkpoint was just loaded); nothing otherwise."""
        if not self._complete:
            self.apply(self._active)

    def use_residency(self, residency: StateResidency) -> None:
        """Move and drop state with ``residency`` from now on (the parameters' device or
        sharding changed before the first step).

        Raises:
            RuntimeError: when the residency in use holds state it moved out.
        """
        if self.residency.offloaded_bytes():
            raise RuntimeError("the optimizer state residency cannot change while it holds "
                               "state it moved out of the optimizer")
        self.residency = residency

    def reapply(self) -> None:
        """Apply :attr:`active` again (parameters were added to the layers)."""
        self.apply(self._active)

    def reset(self) -> None:
        """Forget offloaded state and treat every layer's state as switched in (a
        checkpoint load just put every saved entry into the optimizer);
        :meth:`finish_switch` follows."""
        self.residency.clear()
        self._switched_in = list(range(self.layers.num_layers))
        self._complete = False

    def load_state(self, load: Callable[[list[torch.Tensor] | None], None]) -> None:
        """Put a checkpoint's optimizer state in place and apply :attr:`active` (as
        :meth:`load_state_dict` recorded it).

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
        self._switched_in = []
        self._complete = False
        new = set(self._active)
        if residency.policy == "keep":
            load(None)
            self._switched_in = list(range(self.layers.num_layers))
        else:
            if residency.policy == "offload":
                for index in range(self.layers.num_layers):
                    if index not in new:
                        load(self.layers.params[index])
                        residency.deactivate(self.layers.params[index])
                        residency.synchronize()
            load(self.layers.trained_params(sorted(new)))
            self._switched_in = sorted(new)
        self.apply(self._active)

    # checkpoint: the active set, saved in the sampler's sub-dict of the "ist" entry ------
    def state_dict(self) -> dict[str, Any]:
        """``{"active_layers": [...]}``: the set the coming step trains."""
        return {"active_layers": list(self._active)}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Validate a :meth:`state_dict`, changing nothing.

        Raises:
            ValueError: when ``active_layers`` is missing or not distinct layer indices.
        """
        if "active_layers" not in state:
            raise ValueError("IST checkpoint has no 'active_layers' entry; it is not an "
                             "ISTOptimizer checkpoint or it is truncated")
        active = state["active_layers"]
        try:
            if isinstance(active, str | bytes | Mapping):
                raise ValueError
            check_layer_indices(active, self.layers.num_layers)
        except ValueError:
            shown = f"{type(active).__name__} {active!r}"[:80]
            raise ValueError(
                f"IST checkpoint entry 'active_layers' is {shown}; expected distinct layer "
                f"indices in [0, {self.layers.num_layers})") from None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Record a checkpoint's active set as the set of the coming step; it is put in
        place by :meth:`load_state` or, after :meth:`reset`, :meth:`finish_switch`."""
        self.check_state(state)
        self._active = sorted(int(i) for i in state["active_layers"])
        self._complete = False

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
        active = set(self._active)
        for index, params in enumerate(self.layers.params):
            if index in active:
                continue
            for p in params:
                if p.grad is not None:
                    self._held[id(p)] = (p, p.grad)
                    p.grad = None

    def trained_grads(self) -> list[torch.Tensor]:
        """The gradients the coming update would apply: those of the active layers and of
        the outside group (parameters without a gradient left out)."""
        params = self.layers.trained_params(self._active)
        return [p.grad for p in params if p.grad is not None]

    def grad_norms(self) -> dict[int, float]:
        """L2 norm of each active layer's gradient (layers without one left out); one
        device sync."""
        norms = {i: [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
                     for p in self.layers.params[i] if p.grad is not None]
                 for i in self._active}
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
