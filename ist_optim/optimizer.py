"""``ISTOptimizer``: Importance-aware Sparse Tuning around any torch optimizer.

The class composes small parts and only orchestrates them:

* :class:`ist_optim.ISTConfig`: the options, validated once;
* :class:`ist_optim.LayerGroups`: which layer each trainable parameter belongs to;
* :class:`ist_optim.LayerSampler`: scores, private generator, step count, schedule and
  active set (the sampling rule draws, :mod:`ist_optim.sampling_rules`);
* an :class:`ist_optim.rounds.ImportanceRound`: the estimator, from
  :mod:`ist_optim.registry`;
* :class:`ist_optim.LayerActivator`: applies the active set (``requires_grad``, backward
  cut, state residency);
* :mod:`ist_optim.checkpoint`: the ``"ist"`` entry composed of the parts' state dicts.

The torch optimizer contract (forwarded ``param_groups``/``state``, hooks) is
:class:`ist_optim.wrapper.WrappedOptimizer`'s.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sized
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .activator import LayerActivator
from .batches import LossFn
from .budget import MemoryBudget, memory_report
from .checkpoint import (
    apply_ist_entry,
    full_optimizer_state,
    ist_entry,
    layer_signature,
    pop_ist_entry,
    validate_ist_entry,
)
from .compile import WholeModelCompileGuard, check_not_compiled_whole
from .config import ISTConfig, check_adalora, check_importance_batches, check_optimizer_and_model
from .distributed import (
    agree_on_seed,
    check_not_initialized_late,
    check_wrapping,
    finite_on_every_rank,
    is_sharded,
    resolve_group,
)
from .groups import LayerGroups, LayersSpec, build_layer_groups
from .memory import MemoryPlanner
from .residency import StatePolicy, StateResidency, resolve_state_policy
from .rounds import ImportanceRound, build_round
from .sampler import LayerSampler, check_layer_indices
from .sampling import resolve_count
from .wrapper import WrappedOptimizer

__all__ = ["ISTOptimizer"]


def _params_or_default(model: nn.Module, params: Iterable[Any] | None) -> Iterable[Any]:
    if params is not None:
        if isinstance(params, Sized) and len(params) == 0:
            raise ValueError("params is empty; pass at least one parameter to train, or "
                             "leave params=None to train every parameter that requires grad")
        return params
    chosen = [p for p in model.parameters() if p.requires_grad]
    if not chosen:
        raise ValueError(
            f"{type(model).__name__} has no parameter with requires_grad=True; add "
            "adapters (peft) or unfreeze the weights to train, or pass params="
        )
    return chosen


def _split_options(config: ISTConfig | None, kwargs: dict[str, Any]) -> ISTConfig:
    """The config of ``config=`` or of the IST option keywords in ``kwargs`` (popped; what
    is left goes to the inner optimizer)."""
    options = {name: kwargs.pop(name) for name in ISTConfig.option_names() if name in kwargs}
    if config is None:
        return ISTConfig(**options)
    if not isinstance(config, ISTConfig):
        raise TypeError(f"config must be an ist_optim.ISTConfig, got {type(config).__name__}")
    if options:
        raise ValueError(
            f"config= is given together with the IST options {sorted(options)}; set them in "
            f"the config (dataclasses.replace(config, {next(iter(options))}=...)) or drop "
            "config=")
    return config


class ISTOptimizer(WrappedOptimizer):
    """Importance-aware Sparse Tuning: train a sampled subset of layers each step.

    Wraps ``optimizer_cls`` (AdamW, SGD, Adafactor, LBFGS, bitsandbytes 8-bit
    optimizers, ...). Every step trains the parameters of the sampled layers (plus every
    trainable parameter outside the blocks); every ``update_interval`` steps an importance
    round re-estimates per-layer scores. The IST options (``active_layers``, ``sampling``,
    ``estimator``, ``state_policy``, ``memory_budget``, ``dense_steps``, ...) are the
    fields of :class:`ist_optim.ISTConfig`, documented there, passed as keywords or as
    ``config=``; every other keyword goes verbatim to ``optimizer_cls``.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass (the class, not an instance).
        model: the model being trained (a ``peft.PeftModel`` works as it is).
        params: parameters, named parameters or param groups, as ``optimizer_cls`` takes
            them. Default: every parameter of ``model`` that requires grad at
            construction; every registered parameter counts, whatever its
            ``requires_grad`` later.
        layers: the blocks; ``None`` discovers them (see :func:`ist_optim.discover_layers`),
            or a list of modules, a ``ModuleList`` name, or a regex over module names.
        config: the IST options as one :class:`ist_optim.ISTConfig` (instead of keywords).
        importance_batches: re-iterable of batches for the rounds, cycled. Default: the
            most recent training batch, kept by a forward pre-hook on ``model``.
        loss_fn: ``callable(model, batch) -> scalar loss`` for the rounds. Default
            ``model(**batch).loss``.
        process_group: the ranks that train the same layers and hold the same scores;
            ``None`` means every rank when ``torch.distributed`` is initialized.
        memory_planner: a :class:`ist_optim.MemoryPlanner` for ``memory_budget`` instead of
            the one built from ``memory_shape`` (other models, plain block lists).
        **options_and_optimizer_kwargs: IST options, then ``optimizer_cls``'s keywords.

    Example:
        >>> import torch
        >>> from ist_optim import ISTOptimizer
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(8))
        >>> model = torch.nn.Sequential(*blocks)
        >>> opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0,
        ...                    layers=list(blocks), sampling="uniform")
        >>> len(opt.active_layers), opt.num_layers
        (2, 8)
        >>> model(torch.randn(3, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(self, optimizer_cls: type[Optimizer], model: nn.Module, *,
                 params: Iterable[Any] | None = None, layers: LayersSpec = None,
                 config: ISTConfig | None = None,
                 importance_batches: Iterable[Any] | None = None, loss_fn: LossFn | None = None,
                 process_group: Any = None, memory_planner: MemoryPlanner | None = None,
                 **options_and_optimizer_kwargs: Any) -> None:
        check_optimizer_and_model(optimizer_cls, model, loss_fn)
        optimizer_kwargs = dict(options_and_optimizer_kwargs)
        cfg = self.config = _split_options(config, optimizer_kwargs)
        if memory_planner is not None and cfg.memory_budget is None:
            raise ValueError("memory_planner is set but memory_budget is not; pass "
                             "memory_budget= too, or drop memory_planner")
        check_importance_batches(cfg, importance_batches)
        check_wrapping(model, cfg.freeze_inactive)
        check_adalora(model, cfg.freeze_inactive)
        check_not_compiled_whole(model, cfg.freeze_inactive)
        self._group = resolve_group(process_group)
        self.model = model
        super().__init__(optimizer_cls(_params_or_default(model, params), **optimizer_kwargs))
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.layer_groups: LayerGroups = build_layer_groups(model, trainable, layers)
        num_layers = self.layer_groups.num_layers
        self.sampler = LayerSampler.from_config(cfg, num_layers,
                                                agree_on_seed(cfg.seed, self._group))
        device = trainable[0].device
        policy = resolve_state_policy(cfg.state_policy, self.optimizer, device,
                                      sharded=is_sharded(trainable))
        residency = StateResidency(self.optimizer, policy)
        budget = cfg.memory_budget_bytes
        self.memory_budget: MemoryBudget | None = None if budget is None else (
            MemoryBudget.for_model(
                model, self.optimizer, self.layer_groups.modules, budget,
                shape=cfg.memory_shape, planner=memory_planner,
                cut_backward=cfg.cuts_backward, keeps_all_state=policy == "keep"))
        # Hooks on the model last, once nothing can raise any more (the rounds validate
        # every adapter before they place a hook).
        try:
            self.rounds: ImportanceRound | None = build_round(
                cfg, self.sampler.rule.runs_rounds,
                num_suppressed=resolve_count(cfg.suppressed_layers, num_layers,
                                             "suppressed_layers"),
                group=self._group, model=model, blocks=self.layer_groups.modules,
                batches=importance_batches, loss_fn=loss_fn, device=device)
        except Exception:
            if self.memory_budget is not None:  # let go of the blocks it would manage
                self.memory_budget.close()
            raise
        # Caught at the next step: the model compiled as a whole after this point.
        self._compile_guard = (WholeModelCompileGuard(model) if cfg.freeze_inactive
                               else None)
        self._warned_skip = False
        self.activator = LayerActivator(
            self.layer_groups, residency, freeze_inactive=cfg.freeze_inactive,
            cut_backward=cfg.cuts_backward, defer_first_freeze=self._group is not None)
        self._draw_next()

    # ------------------------------------------------------------------ views
    @property
    def num_layers(self) -> int:
        """Number of layers (blocks holding at least one trainable parameter)."""
        return self.layer_groups.num_layers

    @property
    def layer_names(self) -> list[str]:
        """Module name of each layer, e.g. ``base_model.model.model.layers.3``."""
        return list(self.layer_groups.names)

    @property
    def groups(self) -> LayerGroups:
        """Alias of :attr:`layer_groups` (the per-layer parameters, not ``param_groups``)."""
        return self.layer_groups

    @property
    def num_active(self) -> int:
        """``active_layers`` as a count (what a schedule falls back to)."""
        return self.sampler.num_active

    @property
    def active_layers(self) -> list[int]:
        """Sorted indices of the layers that train in the coming step."""
        return list(self.sampler.active)

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken so far."""
        return self.sampler.num_steps

    @property
    def seed(self) -> int:
        """The seed of the private generator (agreed across ranks)."""
        return self.sampler.seed

    @property
    def update_interval(self) -> int:
        return self.config.update_interval

    @property
    def process_group(self) -> Any:
        """The ranks that agree on the IST state; ``None`` when not distributed."""
        return self._group

    @property
    def runs_importance_rounds(self) -> bool:
        return self.rounds is not None

    @property
    def importance(self) -> torch.Tensor:
        """Per-layer importance, higher = more important (the negated IST score)."""
        return (-self.sampler.scores).to(torch.float32)

    @property
    def scores(self) -> torch.Tensor:
        """The raw IST scores ``s`` (higher = suppressing the layer hurts less)."""
        return self.sampler.scores.clone()

    @property
    def sampling_probabilities(self) -> torch.Tensor:
        """Per-draw probability of each layer: the sampling weights, normalised to sum 1."""
        return self.sampler.probabilities()

    def sampling_spread(self) -> dict[str, float]:
        """Max/min ratio and KL from uniform of :attr:`sampling_probabilities` (for logs)."""
        return self.sampler.spread()

    @property
    def state_policy(self) -> StatePolicy:
        """The state policy in use (the device default resolved)."""
        return self.activator.residency.policy

    @property
    def last_round(self) -> dict[str, Any] | None:
        """Step, candidate sets and measurements of the latest round that updated scores."""
        return self.rounds.last if self.rounds is not None else None

    @property
    def skipped_rounds(self) -> int:
        """Rounds skipped because a measurement was not finite."""
        return self.rounds.skipped_rounds if self.rounds is not None else 0

    def fingerprint(self) -> dict[str, Any]:
        """The sampler's step, active set, scores, seed and generator hash (rank checks)."""
        return self.sampler.fingerprint()

    # ------------------------------------------------------------------ stepping
    def _draw_next(self) -> None:
        """The sampler draws the next set (again, up to ``budget_redraws`` times, while it
        does not fit ``memory_budget`` as it is); it becomes the sampler's active set once
        it is applied, so an interrupted switch leaves the set that trained in place."""
        redraws = self.config.budget_redraws if self.memory_budget is not None else 0
        accept = self.memory_budget.fits_as_is if redraws and self.memory_budget else None
        drawn = self.sampler.draw_active(accept, redraws)
        self._apply(drawn)
        self.sampler.set_active(drawn)

    def _apply(self, layers: list[int]) -> None:
        self.activator.apply(layers)
        if self.memory_budget is not None:
            self.memory_budget.apply(layers)

    def _end_backward(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        @functools.wraps(closure)
        def wrapped() -> Any:
            loss = closure()
            self.activator.hold_inactive_grads()
            if self.rounds is not None:
                self.rounds.end_step()
            return loss
        return wrapped

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Update the active layers, run an importance round every ``update_interval``
        steps, then sample the layers of the next step. A closure goes to the inner
        optimizer (LBFGS evaluates it several times); its loss is returned."""
        if self._group is None:
            check_not_initialized_late()
        if self._compile_guard is not None:
            self._compile_guard.check()
        if closure is not None and self.config.skip_nonfinite:
            raise ValueError("skip_nonfinite checks the gradients before the update, but a "
                             "closure computes them inside it; call step() without a closure")
        if self.activator.applied != self.sampler.active:
            self._apply(self.sampler.active)  # a switch was interrupted: finish it first
        if self.config.skip_nonfinite and not finite_on_every_rank(
                self.activator.trained_grads(), self._group):
            self._skip_step()
            return None
        if closure is None and self.rounds is not None:
            self.rounds.end_step()
        self.activator.wait()
        with self.activator.update_only_active():
            loss = self._step_inner(None if closure is None else self._end_backward(closure))
        if self.sampler.rule.observes_gradients:
            self.sampler.observe(self.activator.grad_norms())
        self.sampler.advance()
        if self.rounds is not None and self.num_steps % self.config.update_interval == 0:
            self.rounds.run(self.sampler)
        self.activator.end_deferral()
        self._draw_next()
        return loss

    def _skip_step(self) -> None:
        self.sampler.skip()
        if self.rounds is not None:
            self.rounds.discard_step()
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                f"IST step {self.num_steps + 1}: a gradient of the active layers is not "
                "finite; the step is skipped (parameters, optimizer state and the sampler "
                "unchanged). Further skipped steps are counted in opt.skipped_steps and "
                "state_dict()['ist'] without warning.", RuntimeWarning, stacklevel=3)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (``skip_nonfinite=True``)."""
        return self.sampler.skipped_steps

    def set_active_layers(self, layers: Iterable[int]) -> None:
        """Train exactly ``layers`` in the coming step instead of the drawn set (for
        experiments and tests); the next ``step()`` draws again as usual.

        Raises:
            ValueError: for indices that are not distinct layers of this optimizer.
        """
        layers = check_layer_indices(layers, self.num_layers)
        self._apply(layers)
        self.sampler.set_active(layers)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its params join their layer or the outside group."""
        self.optimizer.add_param_group(param_group)
        self.layer_groups.add_params(self.optimizer.param_groups[-1]["params"])
        self.activator.apply(self.sampler.active)

    def measure_suppressed_losses(self, candidate_sets: list[list[int]],
                                  batch: Any) -> torch.Tensor:
        """Loss of ``batch`` with each candidate set suppressed (eval mode, no grad);
        train/eval flags and adapter values are restored exactly, also when it raises.

        Raises:
            ValueError: when this optimizer runs no suppression rounds.
        """
        if self.rounds is None:
            raise ValueError(f"sampling={self.config.sampling!r} runs no importance rounds, "
                             "so it measures no suppressed losses")
        return self.rounds.suppressed_losses(candidate_sets, batch)

    def set_importance_batches(self, batches: Iterable[Any], *, batches_seen: int = 0) -> None:
        """Measure the importance rounds on ``batches`` (cycled, after ``batches_seen`` of
        them) instead of captured batches: for sources known only after construction,
        such as a Trainer's eval dataloader (:class:`ist_optim.integrations.ISTCallback`).

        Raises:
            ValueError: when the optimizer runs no rounds, its estimator runs no forward
                passes, or importance batches were already given.
        """
        if self.rounds is None:
            raise ValueError(f"sampling={self.config.sampling!r} runs no importance rounds, "
                             "so it takes no importance batches")
        self.rounds.set_batches(batches, batches_seen)

    # ------------------------------------------------------------------ checkpoints
    def _parts(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "rounds": self.rounds}

    def _signature(self) -> dict[str, Any]:
        return layer_signature(self.layer_groups.names, self.layer_groups.numels())

    def ist_state_dict(self) -> dict[str, Any]:
        """The ``"ist"`` entry of :meth:`state_dict` (see :mod:`ist_optim.checkpoint`)."""
        return ist_entry(self._signature(), self._parts())

    def full_state(self) -> Any:
        """Context manager: the inner optimizer with the offloaded state put back, for
        reading every layer's state (``state_dict``, DCP, accounting)."""
        return full_optimizer_state(self.optimizer, self.activator.residency)

    def _state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (every layer's state, offloaded entries
        included) plus an ``"ist"`` entry; ``weights_only``-loadable."""
        with self.full_state() as inner:
            state = inner.state_dict()
        state["ist"] = self.ist_state_dict()
        return state

    def check_ist_state_dict(self, ist: Any) -> dict[str, Any]:
        """Validate a whole ``"ist"`` entry, changing nothing; returns it in the current
        format (format 1 is upgraded). Raises ``ValueError`` naming what differs."""
        return validate_ist_entry(ist, self._signature(), self._parts())

    def load_ist_state_dict(self, ist: Any) -> None:
        """Apply an ``"ist"`` entry after the inner optimizer's state was loaded (the DCP
        helpers use this); validates it all first."""
        self._apply_ist_entry(self.check_ist_state_dict(ist))

    def _apply_ist_entry(self, ist: dict[str, Any]) -> None:
        """Apply an entry :meth:`check_ist_state_dict` returned."""
        apply_ist_entry(ist, self._parts())
        # The inner optimizer holds every saved entry now; the residency moves (or drops)
        # those of inactive layers, as if every layer had just been active.
        self.activator.reset()
        self._apply(self.sampler.active)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the next step trains the saved active set. All is
        validated first: a checkpoint that does not fit raises ``ValueError`` (naming what
        differs) and leaves this optimizer as it was."""
        inner, ist = pop_ist_entry(
            state_dict, "it was saved by a plain optimizer. Load it into the inner one with "
            "ist_opt.optimizer.load_state_dict(...) instead")
        ist = self.check_ist_state_dict(ist)
        self.optimizer.load_state_dict(inner)
        self._apply_ist_entry(ist)

    def memory_report(self) -> dict[str, Any]:
        """Optimizer-state bytes on the device and offloaded, trainable bytes of the
        coming step, and the budget's prediction: see :func:`ist_optim.budget.memory_report`."""
        return memory_report(self.optimizer, self.activator.residency, self.layer_groups,
                             self.active_layers, self.memory_budget)

    def close(self) -> None:
        """Remove the hooks from the model and re-enable all layers' grads."""
        if self._compile_guard is not None:
            self._compile_guard.remove()
        if self.rounds is not None:
            self.rounds.remove()
        self.activator.close()
        if self.memory_budget is not None:
            self.memory_budget.close()

    def __repr__(self) -> str:
        return (f"ISTOptimizer({type(self.optimizer).__name__}, layers={self.num_layers}, "
                f"active={self.num_active}, sampling={self.config.sampling!r}, "
                f"step={self.num_steps})")

