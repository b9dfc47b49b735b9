"""``WrappedOptimizer``: the torch optimizer contract for a class that wraps another one.

Schedulers, accelerate and the HF Trainer accept only ``torch.optim.Optimizer`` instances
and read ``param_groups``, ``state`` and ``defaults``; torch's hooks (global and per
instance) run around ``step``, ``state_dict`` and ``load_state_dict``. This base gives a
wrapper all of that while the inner optimizer stays the one owner of ``param_groups`` and
``state`` (forwarded through properties with setters, as accelerate does). Subclasses
implement ``step``, :meth:`_state_dict` and :meth:`_load_state_dict`.

Example:
    >>> import torch
    >>> class Plain(WrappedOptimizer):
    ...     def step(self, closure=None):
    ...         return self._step_inner(closure)
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = Plain(torch.optim.SGD([p], lr=0.5))
    >>> p.grad = torch.ones(2); opt.step(); p.tolist()
    [0.5, 0.5]
    >>> opt.param_groups is opt.optimizer.param_groups
    True
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer

__all__ = ["WrappedOptimizer"]


class WrappedOptimizer(Optimizer):
    """An ``Optimizer`` that forwards the torch optimizer contract to ``optimizer``.

    Args:
        optimizer: the inner optimizer (:attr:`optimizer`), which owns ``param_groups``,
            ``state`` and ``defaults``.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        # What Optimizer.__init__ sets, minus param_groups/state/defaults (forwarded).
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _step_inner(self, closure: Callable[[], Any] | None) -> Any:
        """Step the inner optimizer once, without firing torch's global step hooks a second
        time (they ran around this wrapper's ``step``); its own instance hooks still run."""
        inner = self.optimizer
        raw = getattr(type(inner).step, "__wrapped__", None)
        if raw is None or not getattr(type(inner).step, "hooked", False):
            return inner.step(closure) if closure is not None else inner.step()
        args = (inner, closure) if closure is not None else (inner,)
        kwargs: dict[str, Any] = {}
        for hook in inner._optimizer_step_pre_hooks.values():
            result = hook(inner, args, kwargs)
            if result is not None:
                args, kwargs = result
        out = raw(*args, **kwargs)
        for hook in inner._optimizer_step_post_hooks.values():
            hook(inner, args, kwargs)
        return out

    def _state_dict(self) -> dict[str, Any]:
        """The state dict, before the post-hooks (default: the inner optimizer's)."""
        return self.optimizer.state_dict()

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict the pre-hooks have seen (default: into the inner optimizer)."""
        self.optimizer.load_state_dict(state_dict)

    def state_dict(self) -> dict[str, Any]:
        """:meth:`_state_dict`, with this instance's state-dict hooks run around it."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self._state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`_load_state_dict`, with this instance's load hooks run around it."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._load_state_dict(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
