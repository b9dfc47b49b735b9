"""``ISTOptimizer``: Importance-aware Sparse Tuning around any torch optimizer.

The class only composes the parts, each owning its state and its piece of the checkpoint:
the config, the layer groups, the sampler (which draws the sets), the importance round and
the activator (which applies a set and is its one record: ``requires_grad``, backward cut,
state residency, ``memory_budget``). Where
each lives: docs/extending.md. The torch optimizer contract is
:class:`~ist_optim.core.wrapper.WrappedOptimizer`'s, the read-only properties
:class:`~ist_optim.views.ISTViews`'.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .config import (
    ISTConfig,
    check_adalora,
    check_importance_batches,
    check_optimizer_and_model,
    split_options,
)
from .core.activator import LayerActivator
from .core.checkpoint import (
    SharedEntry,
    apply_ist_entry,
    check_inner_structure,
    inner_state_of,
    ist_entry,
    layer_signature,
    pop_ist_entry,
    validate_ist_entry,
)
from .core.compile import WholeModelCompileGuard, check_not_compiled_whole
from .core.follow import ReplacedParams
from .core.groups import (
    LayerGroups,
    LayersSpec,
    build_layer_groups,
    check_layer_indices,
    default_params,
)
from .core.wrapper import WrappedOptimizer
from .distributed.ranks import (
    agree_on_seed,
    check_not_initialized_late,
    check_wrapping,
    finite_on_every_rank,
    is_sharded,
    resolve_group,
)
from .importance.batches import LossFn
from .importance.rounds import ImportanceRound, build_round
from .memory.budget import MemoryBudget
from .memory.report import memory_report
from .memory.residency import StateResidency, resolve_state_policy
from .planner.estimate import MemoryPlanner
from .sampling.draws import resolve_count
from .sampling.sampler import LayerSampler
from .views import ISTViews

__all__ = ["ISTOptimizer"]


class ISTOptimizer(ISTViews, WrappedOptimizer):
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
        cfg = self.config = split_options(config, optimizer_kwargs)
        if memory_planner is not None and cfg.memory_budget is None:
            raise ValueError("memory_planner is set but memory_budget is not; pass "
                             "memory_budget= too, or drop memory_planner")
        check_importance_batches(cfg, importance_batches)
        check_wrapping(model, cfg.freeze_inactive)
        check_adalora(model, cfg.freeze_inactive)
        check_not_compiled_whole(model, cfg.freeze_inactive)
        self.process_group = ranks = resolve_group(process_group)
        self.model = model
        super().__init__(optimizer_cls(default_params(model, params), **optimizer_kwargs))
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.layer_groups: LayerGroups = build_layer_groups(model, trainable, layers)
        num_layers = self.layer_groups.num_layers
        self.sampler = LayerSampler.from_config(cfg, num_layers,
                                                agree_on_seed(cfg.seed, ranks))
        device = trainable[0].device
        policy = resolve_state_policy(cfg.state_policy, self.optimizer, device,
                                      sharded=is_sharded(trainable))
        residency = StateResidency(self.optimizer, policy)
        budget_bytes = cfg.memory_budget_bytes
        budget = None if budget_bytes is None else MemoryBudget.for_model(
            model, self.optimizer, self.layer_groups, budget_bytes,
            shape=cfg.memory_shape, planner=memory_planner,
            cut_backward=cfg.cuts_backward, keeps_all_state=policy == "keep")
        # Hooks on the model last, once nothing can raise any more (the rounds validate
        # every adapter before they place a hook).
        try:
            self.rounds: ImportanceRound | None = build_round(
                cfg, self.sampler.rule.runs_rounds,
                num_suppressed=resolve_count(cfg.suppressed_layers, num_layers,
                                             "suppressed_layers"),
                group=ranks, model=model, blocks=self.layer_groups.modules,
                batches=importance_batches, loss_fn=loss_fn, device=device)
        except Exception:
            if budget is not None:  # let go of the blocks it would manage
                budget.close()
            raise
        # Caught at the next step: the model compiled as a whole after this point.
        self._compile_guard = (WholeModelCompileGuard(model) if cfg.freeze_inactive
                               else None)
        self._warned_skip = False
        self.activator = LayerActivator(
            self.layer_groups, residency, freeze_inactive=cfg.freeze_inactive,
            cut_backward=cfg.cuts_backward, defer_first_freeze=ranks is not None, budget=budget,
            model=model)
        self._replaced = ReplacedParams(self.optimizer)
        self._draw_next()

    # ------------------------------------------------------------------ stepping
    def _follow_replaced_params(self) -> None:
        """Before the first update: take up the parameters a wrapper put in the inner
        optimizer's place of the ones it was built with (accelerate's FSDP2 prepare, so
        the HF Trainer, TRL, axolotl and LLaMA-Factory under FSDP2: their shards, maybe on
        another device). The layers hold the new ones; the state policy and the
        importance batches follow their device and sharding; the active set is applied
        to them."""
        replaced = self._replaced.check()
        if not replaced:
            return
        if self.budget_policy is not None:
            raise ValueError(
                "memory_budget measured the model as it was when ISTOptimizer was built, "
                "and its parameters were replaced since (accelerate's FSDP2 prepare shards "
                "them): drop memory_budget under FSDP2")
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        device = trainable[0].device
        policy = resolve_state_policy(self.config.state_policy, self.optimizer, device,
                                      sharded=is_sharded(trainable))
        self.layer_groups.replace_params(replaced)
        self._replaced.mark_seen()
        if policy != self.state_policy:
            self.activator.use_residency(StateResidency(self.optimizer, policy))
        if self.rounds is not None:
            self.rounds.move_to(device)
        self.activator.reapply()

    def _draw_next(self) -> None:
        """The sampler draws the next set (again, up to ``budget_redraws`` times, while it
        does not fit ``memory_budget`` as it is); the activator applies it and records it
        once it is in place, so an interrupted switch leaves the set that trained."""
        budget = self.budget_policy
        redraws = self.config.budget_redraws if budget is not None else 0
        self.activator.apply(self.sampler.draw_active(
            budget.fits_as_is if redraws and budget else None, redraws))

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
        if self.process_group is None:
            check_not_initialized_late()
        if self._compile_guard is not None:
            self._compile_guard.check()
        self._follow_replaced_params()
        if closure is not None and self.config.skip_nonfinite:
            raise ValueError("skip_nonfinite checks the gradients before the update, but a "
                             "closure computes them inside it; call step() without a closure")
        self.activator.finish_switch()  # after an interrupted switch or a load
        if self.config.skip_nonfinite and not finite_on_every_rank(
                self.activator.trained_grads(), self.process_group):
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

    def set_active_layers(self, layers: Iterable[int]) -> None:
        """Train exactly ``layers`` in the coming step instead of the drawn set (for
        experiments and tests); the next ``step()`` draws again as usual.

        Raises:
            ValueError: for indices that are not distinct layers of this optimizer.
        """
        self.activator.apply(check_layer_indices(layers, self.num_layers))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its params join their layer or the outside group."""
        self._follow_replaced_params()
        self.optimizer.add_param_group(param_group)
        self.layer_groups.add_params(self.optimizer.param_groups[-1]["params"])
        self._replaced.mark_seen()
        self.activator.reapply()

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
        """The owners of the ``"ist"`` entry's parts; the active set (the activator's) is
        saved in the sampler's sub-dict (see :mod:`ist_optim.core.checkpoint`)."""
        return {"sampler": SharedEntry(self.sampler, self.activator), "rounds": self.rounds}

    def _signature(self) -> dict[str, Any]:
        return layer_signature(self.layer_groups.names, self.layer_groups.numels())

    def ist_state_dict(self) -> dict[str, Any]:
        """The ``"ist"`` entry of :meth:`state_dict` (see :mod:`ist_optim.core.checkpoint`)."""
        return ist_entry(self._signature(), self._parts())

    def full_state(self) -> Any:
        """Context manager: the inner optimizer with the offloaded state put back, for
        reading every layer's state (``state_dict``, DCP, accounting)."""
        return self.activator.residency.full_state()

    def _state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (every layer's state, offloaded entries
        included) plus an ``"ist"`` entry; ``weights_only``-loadable."""
        self._follow_replaced_params()
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
        self._follow_replaced_params()
        self._apply_ist_entry(self.check_ist_state_dict(ist))

    def _apply_ist_entry(self, ist: dict[str, Any]) -> None:
        """Apply an entry :meth:`check_ist_state_dict` returned."""
        apply_ist_entry(ist, self._parts())
        # The inner optimizer holds every saved entry now; the residency moves (or drops)
        # those of inactive layers, as if every layer had just been active.
        self.activator.reset()
        self.activator.finish_switch()

    def load_layerwise(self, ist: Any,
                       load_inner: Callable[[list[torch.Tensor] | None], None]) -> None:
        """Load a checkpoint whose inner optimizer state ``load_inner(params)`` loads for
        ``params`` alone, replacing what the inner optimizer holds (``None``: all of it);
        the DCP helpers and :meth:`load_state_dict` use this. ``ist`` is validated first.

        Under ``state_policy="offload"`` the inactive layers' state is loaded one layer at
        a time and offloaded before the next, so resuming needs no more device memory than
        training (see :meth:`ist_optim.LayerActivator.load_state`).
        """
        ist = self.check_ist_state_dict(ist)
        apply_ist_entry(ist, self._parts())
        self.activator.load_state(load_inner)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the next step trains the saved active set. All is
        validated first: a checkpoint that does not fit raises ``ValueError`` (naming what
        differs) and leaves this optimizer as it was."""
        self._follow_replaced_params()  # the Trainer resumes after accelerate's prepare
        inner, ist = pop_ist_entry(
            state_dict, "it was saved by a plain optimizer. Load it into the inner one with "
            "ist_opt.optimizer.load_state_dict(...) instead")
        self.check_ist_state_dict(ist)
        check_inner_structure(self.optimizer, inner)
        self.load_layerwise(ist, lambda params: self.optimizer.load_state_dict(
            inner_state_of(self.optimizer, inner, params)))

    def memory_report(self) -> dict[str, Any]:
        """Optimizer-state bytes on the device and offloaded, trainable bytes of the
        coming step, and the budget's prediction: see
        :func:`ist_optim.memory.report.memory_report`."""
        active = self.active_layers
        return memory_report(self.activator.residency, self.layer_groups.trained_params(active),
                             active, self.budget_policy)

    def close(self) -> None:
        """Remove the hooks from the model and re-enable all layers' grads."""
        if self._compile_guard is not None:
            self._compile_guard.remove()
        if self.rounds is not None:
            self.rounds.remove()
        self.activator.close()

    def __repr__(self) -> str:
        return (f"ISTOptimizer({type(self.optimizer).__name__}, layers={self.num_layers}, "
                f"active_layers={self.num_active}, trained_next={self.num_trained}, "
                f"sampling={self.config.sampling!r}, step={self.num_steps})")

