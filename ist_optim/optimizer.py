"""``ISTOptimizer``: Importance-aware Sparse Tuning around any torch optimizer.

The class composes small parts and only orchestrates them:

* :class:`ist_optim.ISTConfig`: the options, validated once;
* :class:`ist_optim.LayerGroups`: which layer each trainable parameter belongs to;
* :class:`ist_optim.LayerSampler`: scores, private generator, step count, active set;
* an :class:`ist_optim.rounds.ImportanceRound`: the estimator (paper, normalized,
  first-order) and where its batch comes from;
* :class:`ist_optim.LayerActivator`: ``requires_grad``, backward cut, state residency;
* :mod:`ist_optim.checkpoint`: the ``"ist"`` entry composed of the parts' state dicts.

The inner optimizer owns ``param_groups`` and ``state``; the wrapper forwards them.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sized
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .activator import LayerActivator
from .batches import LossFn
from .budget import MemoryBudget
from .checkpoint import (
    STATE_FORMAT_VERSION,
    full_optimizer_state,
    layer_signature,
    pop_ist_entry,
    validate_ist_entry,
)
from .compile import check_not_compiled_whole
from .config import (
    ISTConfig,
    Sampling,
    check_adalora,
    check_importance_batches,
    check_optimizer_and_model,
)
from .distributed import (
    agree_on_seed,
    check_not_initialized_late,
    check_wrapping,
    is_sharded,
    resolve_group,
    state_policy_for,
)
from .estimators import Estimator
from .groups import LayerGroups, LayersSpec, build_layer_groups
from .memory import MemoryPlanner
from .residency import StatePolicy, StateResidency, default_policy, state_bytes
from .rounds import FirstOrderRound, ImportanceRound, SuppressionRound, build_round
from .sampler import LayerSampler
from .sampling import resolve_count
from .suppression import SuppressionMode

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


class ISTOptimizer(Optimizer):
    """Importance-aware Sparse Tuning: train a sampled subset of layers each step.

    Wraps ``optimizer_cls`` (AdamW, SGD, Adafactor, LBFGS, bitsandbytes 8-bit
    optimizers, ...). Every step trains the parameters of ``active_layers`` sampled
    blocks (plus every trainable parameter outside the blocks); every
    ``update_interval`` steps, an importance round re-estimates per-layer scores.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass (the class, not an instance).
        model: the model being trained (a ``peft.PeftModel`` works as it is).
        params: parameters, named parameters or param groups, as ``optimizer_cls`` takes
            them. Default: every parameter of ``model`` that requires grad at
            construction. The layer groups are built from the inner optimizer's
            ``param_groups``, so every registered parameter counts, whatever its
            ``requires_grad`` later.
        layers: the blocks; ``None`` discovers them (see :func:`ist_optim.discover_layers`),
            or a list of modules, a ``ModuleList`` name, or a regex over module names.
        active_layers: layers trained per step (``N_u``), an int or a fraction (0.25); the
            read-only :attr:`num_active` holds the count, :attr:`active_layers` the
            indices drawn for the coming step.
        suppressed_layers: layers damped per candidate set, int or fraction (0.5).
        num_candidates: candidate sets K per importance round (3, at least 2).
        score_lr: step size eta of the score update (10.0).
        suppression: factor lambda on the suppressed responses (0.25), in [0, 1).
        update_interval: steps T between importance rounds (10; first round after step T).
        importance_batches: re-iterable of batches for the rounds, cycled. Default: the
            most recent training batch, kept by a forward pre-hook on ``model``.
        loss_fn: ``callable(model, batch) -> scalar loss`` for the rounds. Default
            ``model(**batch).loss``.
        sampling: ``"importance"`` (weights ``sigmoid(-s)``, the paper), ``"uniform"``
            (LISA-style; runs no importance rounds) or ``"depth-aware"`` (importance
            weights, layers drawn clustered in depth so backward stops higher).
        estimator: ``"paper"`` (default), ``"normalized"`` or ``"first-order"``; see
            :mod:`ist_optim.estimators`.
        suppression_mode: ``"auto"``, ``"adapters"`` or ``"residual"``, see
            :class:`ist_optim.Suppressor`.
        freeze_inactive: ``True`` (default) sets ``requires_grad=False`` on inactive
            layers, so backward skips their weight gradients. ``False`` keeps every
            parameter's ``requires_grad`` and keeps inactive gradients out of the update
            (needed by AdaLoRA, whose rank allocator reads every adapter's gradient).
        state_policy: where the optimizer state of inactive layers lives: ``"keep"``,
            ``"offload"`` (host memory, bit-exact) or ``"drop"``. Default: ``"offload"``
            on CUDA (``"keep"`` for FSDP2 DTensors and paged bitsandbytes optimizers),
            else ``"keep"``. See
            :class:`ist_optim.StateResidency`.
        skip_backward: cut the autograd graph at the input of the lowest active layer
            (:class:`ist_optim.BackwardCut`). Default: ``freeze_inactive``.
        seed: seed of the private ``torch.Generator``; ``None`` seeds it from OS entropy
            (rank 0's under ``torch.distributed``). Global RNGs are never used.
        process_group: the ranks that train the same layers and hold the same scores;
            ``None`` means every rank when ``torch.distributed`` is initialized.
        advantage_scale: ``tau`` of the normalized and first-order estimators (0.1).
        score_retention: ``rho``, the share of the scores kept per such round (0.9).
        scale_decay: ``beta`` of their running loss spread (0.9).
        depth_window: window width of ``sampling="depth-aware"`` (``None``:
            ``min(2 * active, layers)``).
        memory_budget: device memory a step may use, in bytes or as a string
            (``"24GiB"``, ``"512MiB"``); ``None`` (default): no budget. After each draw
            the step's peak is predicted (:class:`ist_optim.MemoryPlanner`) and activation
            checkpointing is turned on for the fewest blocks that make it fit within the
            budget less a 2% planning headroom, none when it fits as it is (see
            :class:`ist_optim.budget.CheckpointPolicy`). Replaces
            the model's own gradient checkpointing setting. Needs ``memory_shape`` or
            ``memory_planner``.
        memory_shape: ``(batch_size, seq_len)`` of the largest batch a step trains on;
            the planner is built from the model (a transformers Llama-style causal LM,
            bare or peft-wrapped; see :func:`ist_optim.budget.planner_for_model`).
        memory_planner: a :class:`ist_optim.MemoryPlanner` to predict with instead
            (other models, plain block lists, or settings the model does not show).
        budget_redraws: with ``memory_budget``, draw the active set again, up to this
            many times, while it does not fit without checkpointing; the first set that
            fits is taken, else the last draw (checkpointed as above). 0 (default): every
            draw is taken. Meant for ``sampling="depth-aware"``; every set keeps a
            non-zero probability, so every layer still trains.
        **optimizer_kwargs: passed verbatim to ``optimizer_cls``.

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

    def __init__(
        self,
        optimizer_cls: type[Optimizer],
        model: nn.Module,
        *,
        params: Iterable[Any] | None = None,
        layers: LayersSpec = None,
        active_layers: int | float = 0.25,
        suppressed_layers: int | float = 0.5,
        num_candidates: int = 3,
        score_lr: float = 10.0,
        suppression: float = 0.25,
        update_interval: int = 10,
        importance_batches: Iterable[Any] | None = None,
        loss_fn: LossFn | None = None,
        sampling: Sampling = "importance",
        estimator: Estimator = "paper",
        suppression_mode: SuppressionMode = "auto",
        freeze_inactive: bool = True,
        state_policy: StatePolicy | None = None,
        skip_backward: bool | None = None,
        seed: int | None = None,
        process_group: Any = None,
        advantage_scale: float = 0.1,
        score_retention: float = 0.9,
        scale_decay: float = 0.9,
        depth_window: int | None = None,
        memory_budget: int | str | None = None,
        memory_shape: tuple[int, int] | None = None,
        memory_planner: MemoryPlanner | None = None,
        budget_redraws: int = 0,
        **optimizer_kwargs: Any,
    ) -> None:
        check_optimizer_and_model(optimizer_cls, model, loss_fn)
        self.config = ISTConfig(
            active_layers=active_layers, suppressed_layers=suppressed_layers,
            num_candidates=num_candidates, score_lr=score_lr, suppression=suppression,
            update_interval=update_interval, sampling=sampling, estimator=estimator,
            suppression_mode=suppression_mode, freeze_inactive=freeze_inactive,
            state_policy=state_policy, skip_backward=skip_backward, seed=seed,
            advantage_scale=advantage_scale, score_retention=score_retention,
            scale_decay=scale_decay, depth_window=depth_window, memory_budget=memory_budget,
            memory_shape=memory_shape, budget_redraws=budget_redraws)
        if memory_planner is not None and memory_budget is None:
            raise ValueError("memory_planner is set but memory_budget is not; pass "
                             "memory_budget= too, or drop memory_planner")
        check_importance_batches(self.config, importance_batches)
        check_wrapping(model, freeze_inactive)
        check_adalora(model, freeze_inactive)
        check_not_compiled_whole(model, freeze_inactive)
        self._group = resolve_group(process_group)

        self.model = model
        self.optimizer: Optimizer = optimizer_cls(_params_or_default(model, params),
                                                  **optimizer_kwargs)
        self._init_torch_optimizer_attributes()
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.layer_groups: LayerGroups = build_layer_groups(model, trainable, layers)
        num_layers = self.layer_groups.num_layers
        self.num_active = resolve_count(active_layers, num_layers, "active_layers")
        num_suppressed = resolve_count(suppressed_layers, num_layers, "suppressed_layers")
        device = trainable[0].device
        self.sampler = LayerSampler(num_layers, self.num_active, sampling,
                                    agree_on_seed(seed, self._group), depth_window)
        policy = state_policy_for(state_policy, default_policy(device, self.optimizer),
                                  is_sharded(trainable), device)
        residency = StateResidency(self.optimizer, policy)  # type: ignore[arg-type]
        budget = self.config.memory_budget_bytes
        self.memory_budget: MemoryBudget | None = None if budget is None else (
            MemoryBudget.for_model(
                model, self.optimizer, self.layer_groups.modules, budget,
                shape=self.config.memory_shape, planner=memory_planner,
                cut_backward=self.config.cuts_backward, keeps_all_state=policy == "keep"))
        # Hooks on the model last, once nothing can raise any more (the rounds validate
        # every adapter before they place a hook).
        try:
            self.rounds: ImportanceRound | None = build_round(
                self.config, num_suppressed=num_suppressed, group=self._group, model=model,
                blocks=self.layer_groups.modules, batches=importance_batches,
                loss_fn=loss_fn, device=device)
        except Exception:
            if self.memory_budget is not None:  # let go of the blocks it would manage
                self.memory_budget.close()
            raise
        self.activator = LayerActivator(
            self.layer_groups, residency, freeze_inactive=freeze_inactive,
            cut_backward=self.config.cuts_backward, defer_first_freeze=self._group is not None)
        self._activate(self._draw())

    # ------------------------------------------------------------------ torch contract
    def _init_torch_optimizer_attributes(self) -> None:
        """What ``Optimizer.__init__`` sets, minus ``param_groups``/``state`` (forwarded)."""
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its params join their layer or the outside group."""
        self.optimizer.add_param_group(param_group)
        self.activator.add_params(self.optimizer.param_groups[-1]["params"])

    # ------------------------------------------------------------------ public views
    @property
    def groups(self) -> LayerGroups:
        """Alias of :attr:`layer_groups` (the per-layer parameters, not ``param_groups``)."""
        return self.layer_groups

    @property
    def num_layers(self) -> int:
        """Number of layers (blocks holding at least one trainable parameter)."""
        return self.layer_groups.num_layers

    @property
    def layer_names(self) -> list[str]:
        """Module name of each layer, e.g. ``base_model.model.model.layers.3``."""
        return list(self.layer_groups.names)

    @property
    def active_layers(self) -> list[int]:
        """Sorted indices of the layers that train in the coming step."""
        return list(self.sampler.active)

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
        """How far :attr:`sampling_probabilities` is from uniform (for logs): see
        :func:`ist_optim.sampling.distribution_spread`."""
        return self.sampler.spread()

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
    def state_policy(self) -> StatePolicy:
        """The state policy in use (the device default resolved)."""
        return self.activator.residency.policy

    @property
    def process_group(self) -> Any:
        """The ranks that agree on the IST state; ``None`` when not distributed."""
        return self._group

    @property
    def runs_importance_rounds(self) -> bool:
        return self.rounds is not None

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
    def _draw(self) -> list[int]:
        """The sampler's draw, redrawn up to ``budget_redraws`` times while it does not
        fit ``memory_budget`` without checkpointing."""
        if self.memory_budget is None or not self.config.budget_redraws:
            return self.sampler.draw_active()
        return self.sampler.draw_active(self.memory_budget.fits_as_is,
                                        self.config.budget_redraws)

    def _activate(self, active: list[int]) -> None:
        self.activator.set_active(active)
        self.sampler.active = list(self.activator.active)
        if self.memory_budget is not None:
            self.memory_budget.apply(self.sampler.active)

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

    def _after_backward(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        @functools.wraps(closure)
        def wrapped() -> Any:
            loss = closure()
            self.activator.hold_inactive_grads()
            if isinstance(self.rounds, FirstOrderRound):
                self.rounds.end_step()
            return loss
        return wrapped

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Update the active layers, run an importance round every ``update_interval``
        steps, then sample the layers of the next step.

        A closure is passed to the inner optimizer (LBFGS evaluates it several times).

        Returns:
            The closure's loss, if a closure was given.
        """
        if self._group is None:
            check_not_initialized_late()
        if closure is None and isinstance(self.rounds, FirstOrderRound):
            self.rounds.end_step()
        self.activator.wait()
        with self.activator.update_only_active():
            loss = self._step_inner(None if closure is None else self._after_backward(closure))
        self.sampler.num_steps += 1
        if self.rounds is not None and self.num_steps % self.config.update_interval == 0:
            self.rounds.run(self.sampler)
        self.activator.end_deferral()
        self._activate(self._draw())
        return loss

    def set_active_layers(self, layers: Iterable[int]) -> None:
        """Train exactly ``layers`` in the coming step instead of the drawn set (for
        experiments and tests); the next ``step()`` draws again as usual.

        Raises:
            ValueError: for indices that are not distinct layers of this optimizer.
        """
        indices = sorted(int(i) for i in layers)
        if (not indices or len(set(indices)) != len(indices)
                or not all(0 <= i < self.num_layers for i in indices)):
            raise ValueError(f"layers must be distinct indices in [0, {self.num_layers}), got "
                             f"{indices}")
        self._activate(indices)

    def measure_suppressed_losses(self, candidate_sets: list[list[int]],
                                  batch: Any) -> torch.Tensor:
        """Loss of ``batch`` with each candidate set suppressed (eval mode, no grad).

        Train/eval flags of every module and all adapter values are restored exactly,
        also when the loss function raises.

        Raises:
            ValueError: when this optimizer's estimator runs no suppressed forwards.
        """
        if not isinstance(self.rounds, SuppressionRound):
            raise ValueError("this optimizer's estimator measures no suppressed losses "
                             "(sampling='uniform' or estimator='first-order')")
        return self.rounds.suppressed_losses(candidate_sets, batch)

    # ------------------------------------------------------------------ checkpoints
    def _parts(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "rounds": self.rounds}

    def _signature(self) -> dict[str, Any]:
        return layer_signature(self.layer_groups.names, self.layer_groups.numels())

    def ist_state_dict(self) -> dict[str, Any]:
        """The ``"ist"`` entry of :meth:`state_dict`: format version, layer signature, and
        the sampler's and the rounds' state dicts (see :mod:`ist_optim.checkpoint`)."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "layers": self._signature(),
            "sampling": self.config.sampling,
            **{name: None if part is None else part.state_dict()
               for name, part in self._parts().items()},
        }

    def full_state(self) -> Any:
        """Context manager: the inner optimizer with the offloaded state put back, for
        reading every layer's state (``state_dict``, DCP, accounting)."""
        return full_optimizer_state(self.optimizer, self.activator.residency)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (every layer's state, offloaded entries
        included) plus an ``"ist"`` entry; ``weights_only``-loadable."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        with self.full_state() as inner:
            state = inner.state_dict()
        state["ist"] = self.ist_state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def check_ist_state_dict(self, ist: Any) -> dict[str, Any]:
        """Validate a whole ``"ist"`` entry against this optimizer, changing nothing.

        Returns:
            The entry in the current format (format 1 is upgraded).

        Raises:
            ValueError: naming what differs or is malformed.
        """
        return validate_ist_entry(ist, self._signature(), self._parts())

    def load_ist_state_dict(self, ist: Any) -> None:
        """Apply an ``"ist"`` entry after the inner optimizer's state was loaded (the DCP
        helpers use this); validates it all first."""
        ist = self.check_ist_state_dict(ist)
        self.sampler.load_state_dict(ist["sampler"])
        if self.rounds is not None:
            self.rounds.load_state_dict(ist["rounds"])
        # The inner optimizer holds every saved entry now; the residency moves (or drops)
        # those of inactive layers, as if every layer had just been active.
        self.activator.reset()
        self._activate(list(self.sampler.active))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the next step trains the saved active set.

        Everything is validated before anything changes: a checkpoint that does not fit
        raises and leaves this optimizer as it was.

        Raises:
            ValueError: when the checkpoint has no or a malformed ``"ist"`` entry, or
                another number of layers or trainable parameters, naming what differs.
        """
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        inner, ist = pop_ist_entry(
            state_dict, "it was saved by a plain optimizer. Load it into the inner one with "
            "ist_opt.optimizer.load_state_dict(...) instead")
        ist = self.check_ist_state_dict(ist)
        self.optimizer.load_state_dict(inner)
        self.load_ist_state_dict(ist)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def set_importance_batches(self, batches: Iterable[Any], *, batches_seen: int = 0) -> None:
        """Measure the importance rounds on ``batches`` (cycled) instead of captured batches.

        For sources known only after construction, such as a Trainer's eval dataloader
        (:class:`ist_optim.integrations.ISTCallback` calls it at ``on_train_begin``).

        Args:
            batches: re-iterable of batches (a list, a DataLoader), as ``importance_batches``.
            batches_seen: how many batches of ``batches`` earlier rounds used: the cycle
                resumes after them.

        Raises:
            ValueError: with ``sampling='uniform'`` (no rounds) or
                ``estimator='first-order'`` (no estimation forwards), or when importance
                batches were already given.
        """
        if self.rounds is None:
            raise ValueError(
                "sampling='uniform' runs no importance rounds, so it takes no importance batches"
            )
        if not isinstance(self.rounds, SuppressionRound):
            raise ValueError(
                "estimator='first-order' runs no estimation forward passes, so it takes no "
                "importance batches"
            )
        self.rounds.batches.replace(batches, batches_seen)

    def memory_report(self) -> dict[str, Any]:
        """Bytes of optimizer state and of the trainable parameters of the active set.

        Returns:
            ``state_bytes_on_device``: state held by the inner optimizer on the
            parameters' devices; ``state_bytes_offloaded``: state in host memory put
            there by ``state_policy="offload"``; ``active_trainable_bytes``: parameters
            trained in the coming step (active layers and the outside group);
            ``active_layers``; ``state_policy``; with ``memory_budget``:
            ``memory_budget`` (bytes), ``predicted_peak_bytes`` of the coming step and
            ``checkpointed_layers``, the blocks checkpointed in it (else None, None, []).
        """
        residency = self.activator.residency
        with self.full_state() as inner:
            total = state_bytes(inner.state.values())
        offloaded = residency.offloaded_bytes()
        params = self.layer_groups.layer_params(self.active_layers) + self.layer_groups.outside
        return {
            "state_bytes_on_device": total - offloaded,
            "state_bytes_offloaded": offloaded,
            "active_trainable_bytes": sum(p.numel() * p.element_size() for p in params),
            "active_layers": self.active_layers,
            "state_policy": self.state_policy,
            **(self.memory_budget.report() if self.memory_budget is not None else
               {"memory_budget": None, "predicted_peak_bytes": None,
                "checkpointed_layers": []}),
        }

    def close(self) -> None:
        """Remove the hooks from the model and re-enable all layers' grads."""
        if self.rounds is not None:
            self.rounds.remove()
        self.activator.close()
        if self.memory_budget is not None:
            self.memory_budget.close()

    def __repr__(self) -> str:
        return (
            f"ISTOptimizer({type(self.optimizer).__name__}, layers={self.num_layers}, "
            f"active={self.num_active}, sampling={self.config.sampling!r}, "
            f"step={self.num_steps})"
        )
