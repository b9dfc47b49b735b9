"""``ISTOptimizer``: Importance-aware Sparse Tuning around any torch optimizer.

The wrapper only orchestrates: the inner optimizer owns ``param_groups`` and ``state``;
layer groups come from :mod:`ist_optim.groups`, sampling from :mod:`ist_optim.sampling`,
the score update from :mod:`ist_optim.importance` and the damping from
:mod:`ist_optim.suppression`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .backward import BackwardCut
from .batches import BatchCapture, BatchCycler, LossFn, default_loss_fn, move_batch
from .checkpoint import STATE_FORMAT_VERSION, check_ist_state, pop_ist_entry
from .compile import check_not_compiled_whole
from .distributed import (
    agree_on_seed,
    average_across_ranks,
    check_not_initialized_late,
    check_wrapping,
    is_sharded,
    resolve_group,
    state_policy_for,
)
from .estimators import (
    Estimator,
    FirstOrderProbe,
    RunningScale,
    normalized_score_update,
    predicted_suppression_deltas,
)
from .groups import LayerGroups, LayersSpec, build_layer_groups
from .importance import paper_advantages, score_update
from .options import (
    Sampling,
    check_batches_usable,
    check_choices,
    check_int,
    check_number,
    collect_params,
    resolve_skip_backward,
)
from .residency import StatePolicy, StateResidency, default_policy, state_bytes
from .sampling import (
    distribution_spread,
    resolve_count,
    sample_candidate_sets,
    sample_depth_aware,
    sample_layers,
    sampling_weights,
)
from .suppression import SuppressionMode, Suppressor

__all__ = ["ISTOptimizer"]

logger = logging.getLogger(__name__)



class ISTOptimizer(Optimizer):
    """Importance-aware Sparse Tuning: train a sampled subset of layers each step.

    Wraps ``optimizer_cls`` (AdamW, SGD, Adafactor, bitsandbytes 8-bit optimizers, ...).
    Every step trains the parameters of ``active_layers`` sampled blocks (plus every
    trainable parameter outside the blocks); every ``update_interval`` steps, an
    importance round re-estimates per-layer scores by response suppression.

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass (the class, not an instance).
        model: the model being trained (a ``peft.PeftModel`` works as it is).
        params: parameters or param groups as ``optimizer_cls`` takes them. Default: every
            parameter of ``model`` that requires grad at construction. Every one is
            registered now, whatever its ``requires_grad`` later.
        layers: the blocks; ``None`` discovers them (see :func:`ist_optim.discover_layers`),
            or a list of modules, a ``ModuleList`` name, or a regex over module names.
        active_layers: layers trained per step, an int or a fraction of the layers (0.25).
        suppressed_layers: layers damped per candidate set, int or fraction (0.5).
        num_candidates: candidate sets K per importance round (3, at least 2).
        score_lr: step size eta of the score update (10.0).
        suppression: factor lambda on the suppressed responses (0.25), in [0, 1).
        update_interval: steps T between importance rounds (10; first round after step T).
        importance_batches: re-iterable of batches for the rounds, cycled. Default: the
            most recent training batch, kept by a forward pre-hook on ``model``.
        loss_fn: ``callable(model, batch) -> loss`` for the rounds. Default
            ``model(**batch).loss``.
        sampling: ``"importance"`` (weights ``sigmoid(-s)``, the paper), ``"uniform"``
            (LISA-style; runs no importance rounds) or ``"depth-aware"`` (importance
            weights, layers drawn clustered in depth so backward stops higher; see
            :func:`ist_optim.sampling.sample_depth_aware`).
        estimator: how importance rounds update scores: ``"paper"`` (default),
            ``"normalized"`` (loss-scale-free advantages) or ``"first-order"`` (no
            extra forward; reads the training backward). See :mod:`ist_optim.estimators`.
        suppression_mode: ``"auto"``, ``"adapters"`` or ``"residual"``, see
            :class:`ist_optim.Suppressor`.
        freeze_inactive: ``True`` (default) sets ``requires_grad=False`` on inactive
            layers, so backward skips their weight gradients. ``False`` keeps every
            parameter's ``requires_grad`` and drops inactive gradients before the update
            (slower; useful where the set of parameters with grads must stay static).
        state_policy: where the optimizer state of inactive layers lives: ``"keep"``
            (stays, like the paper), ``"offload"`` (moved to host memory, pinned on CUDA,
            and back when the layer is drawn; bit-exact) or ``"drop"`` (freed; a layer
            drawn again restarts its moments and bias correction). Default: ``"offload"``
            when the parameters are on CUDA (``"keep"`` for FSDP2 DTensor parameters, see
            docs/distributed.md), else ``"keep"``. See
            :class:`ist_optim.StateResidency`.
        skip_backward: cut the autograd graph at the input of the lowest active layer
            (see :class:`ist_optim.BackwardCut`), so no backward runs below it even when
            input gradients are forced (gradient checkpointing). Default: on whenever
            ``freeze_inactive`` is (the cut needs frozen inactive layers).
        seed: seed of the private ``torch.Generator``; ``None`` seeds it from OS entropy.
            Global RNGs are never used. Under ``torch.distributed`` every rank must pass
            the same seed, or ``None`` on every rank to use rank 0's (docs/distributed.md).
        process_group: the ranks that must train the same layers and hold the same
            scores; ``None`` (default) means every rank, when ``torch.distributed`` is
            initialized. Ranks agree on the seed at construction and average the
            importance losses, and with ``freeze_inactive`` the first step keeps every
            layer's ``requires_grad`` (a DDP wrapper built after this optimizer must see
            every trainable parameter).
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
        **optimizer_kwargs: Any,
    ) -> None:
        check_choices(optimizer_cls, model, sampling, estimator, state_policy, seed, loss_fn)
        skip_backward = resolve_skip_backward(freeze_inactive, skip_backward)
        check_batches_usable(sampling, estimator, importance_batches)
        check_wrapping(model, freeze_inactive)
        check_not_compiled_whole(model, freeze_inactive)
        self._group = resolve_group(process_group)

        params, trainable = collect_params(model, params)

        self.model = model
        self.optimizer: Optimizer = optimizer_cls(params, **optimizer_kwargs)
        self._init_torch_optimizer_attributes()
        self.groups: LayerGroups = build_layer_groups(model, trainable, layers)
        num_layers = self.groups.num_layers
        self.num_active = resolve_count(active_layers, num_layers, "active_layers")
        self.num_suppressed = resolve_count(suppressed_layers, num_layers, "suppressed_layers")
        self.num_candidates = check_int("num_candidates", num_candidates, 2)
        self.score_lr = check_number("score_lr", score_lr, 0.0, math.inf, closed_high=False)
        self.suppression = check_number("suppression", suppression, 0.0, 1.0, closed_high=False)
        self.update_interval = check_int("update_interval", update_interval, 1)
        self.sampling: Sampling = sampling
        self.estimator: Estimator = estimator
        self.freeze_inactive = freeze_inactive
        self.loss_fn: LossFn = loss_fn or default_loss_fn

        self._generator = torch.Generator(device="cpu")
        self.seed = agree_on_seed(seed, self._group)
        self._generator.manual_seed(self.seed)
        self._defer_freeze = self._group is not None
        self._scores = torch.zeros(num_layers, dtype=torch.float64)
        self._num_steps = 0
        self._skipped_rounds = 0
        self._warned_nonfinite = False
        self.last_round: dict[str, Any] | None = None

        self._suppressor: Suppressor | None = None
        if self.runs_importance_rounds:
            self._suppressor = Suppressor(self.groups.modules, self.suppression, suppression_mode)
        self._cycler = None if importance_batches is None else BatchCycler(importance_batches)
        self.state_policy: StatePolicy = state_policy_for(  # type: ignore[assignment]
            state_policy, default_policy(self._device()), is_sharded(trainable), self._device())
        self._residency = StateResidency(self.optimizer, self.state_policy)
        self._scale = RunningScale()
        # Hooks on the model last, once nothing can raise any more (the probe validates
        # every adapter before it registers a hook, so it goes first).
        self._probe: FirstOrderProbe | None = None
        if estimator == "first-order" and self._suppressor is not None:
            self._probe = FirstOrderProbe(self.groups.modules, self._suppressor.mode)
        self._capture: BatchCapture | None = None
        if self.runs_importance_rounds and importance_batches is None and self._probe is None:
            self._capture = BatchCapture(model)
        self._backward_cut = BackwardCut(self.groups.modules) if skip_backward else None
        self._active: list[int] = []
        self._set_active(self._sample_active())

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
        blocks = {id(p): i for i, m in enumerate(self.groups.modules) for p in m.parameters()}
        for p in self.optimizer.param_groups[-1]["params"]:
            index = blocks.get(id(p))
            if index is None:
                self.groups.outside.append(p)
            else:
                self.groups.params[index].append(p)
                if self._freezes_now:
                    p.requires_grad_(index in self._active)

    # ------------------------------------------------------------------ public views
    @property
    def num_layers(self) -> int:
        """Number of layers (blocks holding at least one trainable parameter)."""
        return self.groups.num_layers

    @property
    def layer_names(self) -> list[str]:
        """Module name of each layer, e.g. ``base_model.model.model.layers.3``."""
        return list(self.groups.names)

    @property
    def active_layers(self) -> list[int]:
        """Sorted indices of the layers that train in the coming step."""
        return list(self._active)

    @property
    def importance(self) -> torch.Tensor:
        """Per-layer importance, higher = more important (the negated IST score)."""
        return (-self._scores).to(torch.float32)

    @property
    def scores(self) -> torch.Tensor:
        """The raw IST scores ``s`` (higher = suppressing the layer hurts less)."""
        return self._scores.clone()

    @property
    def sampling_probabilities(self) -> torch.Tensor:
        """Per-draw probability of each layer: the sampling weights, normalised to sum 1."""
        weights = self._active_weights()
        return (weights / weights.sum()).to(torch.float32)

    def sampling_spread(self) -> dict[str, float]:
        """How far :attr:`sampling_probabilities` is from uniform (for logs).

        Returns:
            ``max_min_ratio``, ``kl_from_uniform`` (nats) and ``entropy_ratio``, see
            :func:`ist_optim.sampling.distribution_spread`.
        """
        return distribution_spread(self.sampling_probabilities)

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken so far."""
        return self._num_steps

    @property
    def process_group(self) -> Any:
        """The ranks that agree on the IST state; ``None`` when not distributed."""
        return self._group

    @property
    def runs_importance_rounds(self) -> bool:
        return self.sampling != "uniform"

    # ------------------------------------------------------------------ stepping
    def _active_weights(self) -> torch.Tensor:
        if self.sampling == "uniform":
            return torch.ones(self.num_layers, dtype=torch.float64)
        return sampling_weights(self._scores, -1.0)

    def _sample_active(self) -> list[int]:
        if self.sampling == "depth-aware":
            return sample_depth_aware(self._active_weights(), self.num_active, self._generator)
        return sample_layers(self._active_weights(), self.num_active, self._generator)

    @property
    def _freezes_now(self) -> bool:
        """Whether inactive layers get ``requires_grad=False`` (not during a deferred step 1)."""
        return self.freeze_inactive and not self._defer_freeze

    def _set_active(self, active: list[int]) -> None:
        old, new = set(self._active), set(active)
        self._residency.deactivate(self.groups.layer_params(sorted(old - new)))
        self._residency.activate(self.groups.layer_params(sorted(new - old)))
        self._active = sorted(new)
        if self._backward_cut is not None:
            self._backward_cut.set_active(self._active)
        if not self._freezes_now:
            return
        for index, params in enumerate(self.groups.params):
            for p in params:
                p.requires_grad_(index in new)

    def _drop_inactive_grads(self) -> None:
        active_set = set(self._active)
        for index, params in enumerate(self.groups.params):
            if index not in active_set:
                for p in params:
                    p.grad = None

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Update the active layers, run an importance round every ``update_interval``
        steps, then sample the layers of the next step.

        Returns:
            The closure's loss, if a closure was given.
        """
        if self._group is None:
            check_not_initialized_late()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._probe is not None:
            self._probe.end_step()
        self._drop_inactive_grads()
        self._residency.wait()
        self.optimizer.step()
        self._num_steps += 1
        if self.runs_importance_rounds and self._num_steps % self.update_interval == 0:
            self._importance_round()
        self._defer_freeze = False
        self._set_active(self._sample_active())
        return loss

    # ------------------------------------------------------------------ importance
    def _importance_batch(self) -> Any:
        if self._cycler is not None:
            batch = self._cycler.next()
            return move_batch(batch, self._device())
        assert self._capture is not None
        if self._capture.latest is None:
            raise RuntimeError(
                "an importance round is due but the model has not been called since the "
                "optimizer was built, so there is no batch to measure; call the model "
                "before step(), or pass importance_batches="
            )
        latest = self._capture.latest
        return latest if self.loss_fn is default_loss_fn else latest.as_batch()

    def _device(self) -> torch.device:
        return self.groups.params[0][0].device

    def measure_suppressed_losses(
        self, candidate_sets: list[list[int]], batch: Any
    ) -> torch.Tensor:
        """Loss of ``batch`` with each candidate set suppressed (eval mode, no grad).

        Train/eval flags of every module and all adapter values are restored exactly,
        also when the loss function raises.
        """
        assert self._suppressor is not None
        modes = [(module, module.training) for module in self.model.modules()]
        if self._capture is not None:
            self._capture.enabled = False
        losses = []
        try:
            self.model.eval()
            with torch.no_grad():
                for members in candidate_sets:
                    with self._suppressor.suppress(members):
                        losses.append(float(self.loss_fn(self.model, batch)))
        finally:
            for module, training in modes:
                module.training = training
            if self._capture is not None:
                self._capture.enabled = True
        return torch.tensor(losses, dtype=torch.float64)

    def _importance_round(self) -> None:
        if self._probe is not None:
            reached, losses = predicted_suppression_deltas(*self._probe.take(), self.suppression)
            sets = [[i] for i in reached]
            if len(sets) < 2:
                logger.debug("IST first-order round at step %d: %d layer(s) reached, no update",
                             self._num_steps, len(sets))
                return
        else:
            batch = self._importance_batch()
            weights = sampling_weights(self._scores, +1.0)
            sets = sample_candidate_sets(weights, self.num_suppressed, self.num_candidates,
                                         self._generator)
            losses = self.measure_suppressed_losses(sets, batch)
        losses = average_across_ranks(losses, self._group)
        if not torch.isfinite(losses).all():
            self._skipped_rounds += 1
            if not self._warned_nonfinite:
                self._warned_nonfinite = True
                warnings.warn(
                    f"IST importance round at step {self._num_steps} measured a non-finite "
                    f"loss ({losses.tolist()}); the round is skipped and scores are unchanged. "
                    "Further skipped rounds are counted in state_dict()['ist'] without warning.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        if self.estimator == "paper":
            self._scores = score_update(self._scores, sets, paper_advantages(losses),
                                        self.score_lr)
        else:
            self._scores = normalized_score_update(self._scores, sets, losses, self._scale,
                                                   self.score_lr)
        self.last_round = {"step": self._num_steps, "sets": sets, "losses": losses.tolist()}
        logger.debug("IST round at step %d: sets=%s losses=%s", self._num_steps, sets,
                     losses.tolist())

    # ------------------------------------------------------------------ checkpoints
    def _ist_state(self) -> dict[str, Any]:
        return {
            "format_version": STATE_FORMAT_VERSION,
            "num_layers": self.num_layers,
            "layer_names": list(self.groups.names),
            "layer_numels": self.groups.numels(),
            "scores": self._scores.clone(),
            "generator_state": self._generator.get_state(),
            "active_layers": list(self._active),
            "num_steps": self._num_steps,
            "skipped_rounds": self._skipped_rounds,
            "importance_batches_seen": self._cycler.seen if self._cycler else 0,
            "sampling": self.sampling,
            "seed": self.seed,
            "estimator": self.estimator,
            "estimator_state": {
                "scale": self._scale.state_dict(),
                "probe": self._probe.state_dict() if self._probe is not None else None,
            },
        }

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus an ``"ist"`` entry (scores, generator
        state, active set, step) in plain types and tensors (``weights_only``-loadable)."""
        offloaded = self._residency.offloaded_state()
        self.optimizer.state.update(offloaded)  # let the inner optimizer format them
        try:
            state = self.optimizer.state_dict()
        finally:
            for param in offloaded:
                del self.optimizer.state[param]
        state["ist"] = self._ist_state()
        return state

    def _check_ist_state(self, ist: dict[str, Any]) -> None:
        check_ist_state(ist, num_layers=self.num_layers, layer_numels=self.groups.numels(),
                        estimator=self.estimator)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; the next step trains the saved active set.

        Raises:
            ValueError: when the checkpoint has no ``"ist"`` entry, or another number of
                layers or trainable parameters, naming what differs.
        """
        state_dict, ist = pop_ist_entry(
            state_dict, "it was saved by a plain optimizer. Load it into the inner one with "
            "ist_opt.optimizer.load_state_dict(...) instead")
        self._check_ist_state(ist)
        self.optimizer.load_state_dict(state_dict)
        self._load_ist_state(ist)

    def _load_ist_state(self, ist: dict[str, Any]) -> None:
        """Restore the wrapper's state from a checked ``"ist"`` entry, after the inner
        optimizer's state was loaded."""
        estimator_state = ist.get("estimator_state")
        if estimator_state is not None:
            self._scale.load_state_dict(estimator_state["scale"])
            if self._probe is not None and estimator_state["probe"] is not None:
                self._probe.load_state_dict(estimator_state["probe"])
        # The inner optimizer now holds every saved entry; the residency policy then moves
        # (or drops) those of inactive layers, as if every layer had just been active.
        self._residency.clear()
        self._active = list(range(self.num_layers))
        # .cpu(): accelerate's prepare() and the Trainer's map_location move every tensor of
        # the dict to the accelerator; the sampler's state lives on the CPU.
        self._scores = ist["scores"].to("cpu", torch.float64).clone()
        self._generator.set_state(ist["generator_state"].cpu())
        self._num_steps = int(ist["num_steps"])
        self._skipped_rounds = int(ist["skipped_rounds"])
        self.seed = int(ist["seed"])
        if self._cycler is not None:
            self._cycler.fast_forward(int(ist["importance_batches_seen"]))
        self._set_active([int(i) for i in ist["active_layers"]])

    def set_importance_batches(self, batches: Iterable[Any], *, batches_seen: int = 0) -> None:
        """Measure the importance rounds on ``batches`` (cycled) instead of captured batches.

        For sources known only after construction, such as a Trainer's eval dataloader
        (:class:`ist_optim.integrations.ISTCallback` calls it at ``on_train_begin``).

        Args:
            batches: re-iterable of batches (a list, a DataLoader), as ``importance_batches``.
            batches_seen: how many batches of ``batches`` earlier rounds used: the cycle
                resumes after them (``num_steps // update_interval`` when ``batches`` was
                set before step 1).

        Raises:
            ValueError: with ``sampling='uniform'`` (no rounds) or
                ``estimator='first-order'`` (no estimation forwards), or when importance
                batches were already given, at construction or by an earlier call.
        """
        if not self.runs_importance_rounds:
            raise ValueError(
                "sampling='uniform' runs no importance rounds, so it takes no importance batches"
            )
        if self.estimator == "first-order":
            raise ValueError(
                "estimator='first-order' runs no estimation forward passes, so it takes no "
                "importance batches"
            )
        if self._cycler is not None:
            raise ValueError(
                "importance batches are already set (importance_batches= or an earlier "
                "set_importance_batches call); build the optimizer without them to set them here"
            )
        cycler = BatchCycler(batches)
        cycler.fast_forward(check_int("batches_seen", batches_seen, 0))
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        self._cycler = cycler

    def memory_report(self) -> dict[str, Any]:
        """Bytes of optimizer state and of the trainable parameters of the active set.

        Returns:
            ``state_bytes_on_device``: state held by the inner optimizer (on the
            parameters' devices); ``state_bytes_offloaded``: state moved to host memory by
            ``state_policy="offload"``; ``active_trainable_bytes``: parameters trained in
            the coming step (active layers and the outside group); ``active_layers``;
            ``state_policy``.
        """
        params = self.groups.layer_params(self._active) + self.groups.outside
        return {
            "state_bytes_on_device": state_bytes(self.optimizer.state.values()),
            "state_bytes_offloaded": self._residency.offloaded_bytes(),
            "active_trainable_bytes": sum(p.numel() * p.element_size() for p in params),
            "active_layers": list(self._active),
            "state_policy": self.state_policy,
        }

    def close(self) -> None:
        """Remove the hooks from the model and re-enable all layers' grads."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._backward_cut is not None:
            self._backward_cut.remove()
            self._backward_cut = None
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        if self.freeze_inactive:
            for params in self.groups.params:
                for p in params:
                    p.requires_grad_(True)

    def __repr__(self) -> str:
        return (
            f"ISTOptimizer({type(self.optimizer).__name__}, layers={self.num_layers}, "
            f"active={self.num_active}, sampling={self.sampling!r}, step={self._num_steps})"
        )
