"""``LayerSampler``: the per-layer scores, the private generator, the step count and the
active-count schedule, with the draws that read them and the checkpoint entry that saves
them; :class:`SamplerView`, the read-only view an importance round gets.

The sampler draws "which layers train in the coming step": the optimizer asks it to
:meth:`~LayerSampler.advance` after a step and to draw the next set, and hands the set to
the activator (:class:`ist_optim.LayerActivator`), which applies it and is its one record.
How a set is drawn is the sampling rule's (:mod:`ist_optim.sampling.rules`); how many
layers, the schedule's (:class:`ist_optim.ActiveSchedule`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..config import ISTConfig
from ..registry import sampling_rule
from .draws import distribution_spread, resolve_count, sample_candidate_sets, sampling_weights
from .rules import SamplingRule
from .schedule import ActiveSchedule

__all__ = ["LayerSampler", "SamplerView"]


def _bad(key: str, value: Any, expected: str) -> ValueError:
    shown = f"{type(value).__name__} {value!r}"[:80]
    return ValueError(f"IST checkpoint entry {key!r} is {shown}; expected {expected}")


class LayerSampler:
    """Scores, generator, step count and schedule of an IST run, and the draws.

    Args:
        rule: the sampling rule (:mod:`ist_optim.sampling.rules`), which knows ``L``
            and ``N_u``.
        seed: seed of the private ``torch.Generator`` (global RNGs are never used).
        schedule: layers per step; default ``rule.num_active`` at every step.

    Example:
        >>> config = ISTConfig(active_layers=2, sampling="uniform")
        >>> sampler = LayerSampler.from_config(config, num_layers=8, seed=0)
        >>> len(sampler.draw_active())
        2
        >>> state = sampler.state_dict()
        >>> state["sampling"]
        'uniform'
        >>> other = LayerSampler.from_config(config, num_layers=8, seed=1)
        >>> other.load_state_dict(state)
        >>> other.draw_active() == sampler.draw_active()
        True
    """

    def __init__(self, rule: SamplingRule, seed: int, schedule: ActiveSchedule | None = None):
        self.rule = rule
        self.schedule = schedule or ActiveSchedule(rule.num_layers, rule.num_active)
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.scores = torch.zeros(self.num_layers, dtype=torch.float64)
        self.num_steps = 0
        self.skipped_steps = 0

    @property
    def num_layers(self) -> int:
        """``L``, the rule's."""
        return self.rule.num_layers

    @property
    def num_active(self) -> int:
        """``N_u``, the configured layers per step (the rule's); a step's own count is
        :meth:`count`."""
        return self.rule.num_active

    @classmethod
    def from_config(cls, config: ISTConfig, num_layers: int, seed: int) -> LayerSampler:
        """The sampler of ``config``'s ``active_layers``, ``sampling`` rule and schedule
        (``dense_steps``, ``ramp_steps``, ``active_schedule``) over ``num_layers`` layers.

        Raises:
            ValueError: when ``active_layers`` exceeds ``num_layers``, or the rule refuses
                its options (e.g. a ``depth_window`` outside ``[N_u, L]``).
        """
        num_active = resolve_count(config.active_layers, num_layers, "active_layers")
        rule = sampling_rule(config.sampling)(num_layers, num_active, config)
        schedule = ActiveSchedule(num_layers, num_active, config.dense_steps,
                                  config.ramp_steps, config.active_schedule)
        return cls(rule, seed, schedule)

    @property
    def sampling(self) -> str:
        """The name of the sampling rule."""
        return self.rule.name

    # ------------------------------------------------------------------ steps
    def advance(self) -> None:
        """Count one optimizer step taken (the schedule moves with it)."""
        self.num_steps += 1

    def observe(self, grad_norms: Mapping[int, float]) -> None:
        """Pass the trained layers' gradient norms to the rule (if it observes them)."""
        self.rule.observe(grad_norms)

    def skip(self) -> None:
        """Count one step skipped (not taken: the step count, schedule and active set stay)."""
        self.skipped_steps += 1

    def count(self) -> int:
        """Layers to train in the coming step (the schedule at :attr:`num_steps`)."""
        return self.schedule.count(self.num_steps)

    # ------------------------------------------------------------------ draws
    def training_weights(self) -> torch.Tensor:
        """Per-layer weights of the training draw (the rule's, e.g. ``sigmoid(-s)``)."""
        return self.rule.weights(self.scores)

    def probabilities(self) -> torch.Tensor:
        """The training weights normalised to sum 1 (float32)."""
        weights = self.training_weights()
        return (weights / weights.sum()).to(torch.float32)

    def spread(self) -> dict[str, float]:
        """:func:`ist_optim.sampling.draws.distribution_spread` of :meth:`probabilities`."""
        return distribution_spread(self.probabilities())

    def draw_active(self, accept: Callable[[list[int]], bool] | None = None,
                    redraws: int = 0) -> list[int]:
        """Draw the :meth:`count` layers of the next step (sorted); applying them is the
        activator's (:meth:`ist_optim.LayerActivator.apply`).

        Args:
            accept: a predicate on a drawn set; ``None`` (default) takes the first draw.
            redraws: how many more draws to make while ``accept`` refuses (0: one draw,
                as without ``accept``). The first accepted set of the ``redraws + 1``
                draws is returned, else the last one, so every set the draw can produce
                keeps a non-zero probability. Every draw uses the private generator.

        Example:
            >>> config = ISTConfig(active_layers=2, sampling="depth-aware")
            >>> sampler = LayerSampler.from_config(config, num_layers=8, seed=0)
            >>> high = sampler.draw_active(lambda layers: min(layers) >= 4, redraws=8)
            >>> len(high)
            2
        """
        if isinstance(redraws, bool) or not isinstance(redraws, int) or redraws < 0:
            raise ValueError(f"Invalid redraws: {redraws!r}; expected an int >= 0")
        weights = self.training_weights()
        count = self.count()
        drawn = self.rule.draw(weights, count, self.generator)
        if accept is None:
            return drawn
        for _ in range(redraws):
            if accept(drawn):
                break
            drawn = self.rule.draw(weights, count, self.generator)
        return drawn

    def draw_candidates(self, set_size: int, num_sets: int) -> list[list[int]]:
        """The paper's candidate sets: distinct sets drawn with weights ``sigmoid(s)``."""
        return sample_candidate_sets(sampling_weights(self.scores, +1.0), set_size, num_sets,
                                     self.generator)

    def set_scores(self, scores: torch.Tensor) -> None:
        """Replace the scores (what an importance round computed).

        Raises:
            ValueError: for a tensor that is not of shape ``(num_layers,)``.
        """
        if scores.shape != (self.num_layers,):
            raise ValueError(f"scores must have shape ({self.num_layers},), got "
                             f"{tuple(scores.shape)}")
        self.scores = scores.detach().to("cpu", torch.float64).clone()

    def view(self) -> SamplerView:
        """The read-only view of this sampler that importance rounds measure with."""
        return SamplerView(self)

    def fingerprint(self) -> dict[str, Any]:
        """Step, scores, seed and a hash of the generator state (for checks that several
        processes hold the same sampler)."""
        generator = hashlib.sha256(self.generator.get_state().numpy().tobytes()).hexdigest()
        return {"num_steps": self.num_steps, "scores": self.scores.tolist(),
                "generator": generator[:16], "seed": self.seed}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Scores, generator state, step counts, seed, the rule's name (``"sampling"``) and
        its own state (``"rule"``, when it has any); plain types and tensors."""
        return {
            "sampling": self.rule.name,
            "scores": self.scores.clone(),
            "generator_state": self.generator.get_state(),
            "num_steps": self.num_steps,
            "seed": self.seed,
            "skipped_steps": self.skipped_steps,
            **({"rule": rule} if (rule := self.rule.state_dict()) else {}),
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Validate a :meth:`state_dict` entry completely, changing nothing.

        Raises:
            ValueError: naming the first entry that is missing or malformed, or the rule
                the checkpoint was saved with when it is not this sampler's (checkpoints
                written before the rule was recorded load into any rule).
        """
        saved = state.get("sampling", self.sampling)
        if saved != self.sampling:
            raise ValueError(
                f"checkpoint was saved with sampling={saved!r}, this optimizer uses "
                f"sampling={self.sampling!r}; build it with sampling={saved!r}")
        for key in ("scores", "generator_state", "num_steps", "seed"):
            if key not in state:
                raise ValueError(f"IST checkpoint has no {key!r} entry; it is not an "
                                 "ISTOptimizer checkpoint or it is truncated")
        scores = state["scores"]
        if not isinstance(scores, torch.Tensor) or scores.shape != (self.num_layers,):
            raise _bad("scores", scores, f"a tensor of shape ({self.num_layers},)")
        if not scores.is_floating_point() or not torch.isfinite(scores).all():
            raise _bad("scores", scores, "finite floating-point scores")
        steps = state["num_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise _bad("num_steps", steps, "an int >= 0")
        seed = state["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad("seed", seed, "an int")
        rule = state.get("rule", {})
        if not isinstance(rule, Mapping):
            raise _bad("rule", rule, f"the state of sampling rule {self.sampling!r}")
        self.rule.check_state(rule)
        skipped = state.get("skipped_steps", 0)  # absent before version 0.3
        if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
            raise _bad("skipped_steps", skipped, "an int >= 0")
        generator_state = state["generator_state"]
        if not isinstance(generator_state, torch.Tensor) or generator_state.dtype != torch.uint8:
            raise _bad("generator_state", generator_state, "a uint8 tensor")
        try:
            torch.Generator().set_state(generator_state.cpu())
        except (RuntimeError, ValueError) as error:
            raise _bad("generator_state", generator_state,
                       f"a CPU generator state ({error})") from None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict` entry after :meth:`check_state` (which it runs first)."""
        self.check_state(state)
        # .cpu(): accelerate's prepare() and the Trainer's map_location move every tensor
        # of a checkpoint to the accelerator; the sampler's state lives on the CPU.
        self.scores = state["scores"].to("cpu", torch.float64).clone()
        self.generator.set_state(state["generator_state"].cpu())
        self.num_steps = int(state["num_steps"])
        self.seed = int(state["seed"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rule.load_state_dict(state.get("rule", {}))


class SamplerView:
    """What an importance round may read of the sampler, and the one draw it may make.

    It reads the step count, the layer counts, the scores (a copy) and the training
    probabilities, and draws candidate sets with the sampler's private generator (so a
    run stays reproducible from a checkpoint); it cannot change the scores (the round's
    :meth:`~ist_optim.ImportanceRound.update` returns them) or anything else.

    Example:
        >>> sampler = LayerSampler.from_config(ISTConfig(active_layers=2), 6, seed=0)
        >>> view = sampler.view()
        >>> view.num_layers, view.num_steps, len(view.draw_candidates(2, 3))
        (6, 0, 3)
        >>> view.scores = None
        Traceback (most recent call last):
        ...
        AttributeError: property 'scores' of 'SamplerView' object has no setter
    """

    __slots__ = ("_sampler",)

    def __init__(self, sampler: LayerSampler) -> None:
        self._sampler = sampler

    @property
    def num_layers(self) -> int:
        """``L``."""
        return self._sampler.num_layers

    @property
    def num_active(self) -> int:
        """``N_u``, the configured layers per step."""
        return self._sampler.num_active

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken so far."""
        return self._sampler.num_steps

    @property
    def sampling(self) -> str:
        """The name of the sampling rule."""
        return self._sampler.sampling

    @property
    def scores(self) -> torch.Tensor:
        """A copy of the scores ``s`` (float64, shape ``(L,)``)."""
        return self._sampler.scores.clone()

    def probabilities(self) -> torch.Tensor:
        """The training draw's per-layer probabilities (float32, summing to 1)."""
        return self._sampler.probabilities()

    def draw_candidates(self, set_size: int, num_sets: int) -> list[list[int]]:
        """The paper's candidate sets (:meth:`LayerSampler.draw_candidates`)."""
        return self._sampler.draw_candidates(set_size, num_sets)
