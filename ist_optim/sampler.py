"""``LayerSampler``: the per-layer scores, the private generator, the step count and the
active set, with the draws that read them and the checkpoint entry that saves them.

The draws themselves are the pure functions of :mod:`ist_optim.sampling`; this class owns
the state they read, so one object answers "which layers train next, and why".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .sampling import (
    distribution_spread,
    sample_candidate_sets,
    sample_depth_aware,
    sample_layers,
    sampling_weights,
)

__all__ = ["LayerSampler"]

_SAMPLINGS = ("importance", "uniform", "depth-aware")


def _bad(key: str, value: Any, expected: str) -> ValueError:
    shown = f"{type(value).__name__} {value!r}"[:80]
    return ValueError(f"IST checkpoint entry {key!r} is {shown}; expected {expected}")


class LayerSampler:
    """Scores, generator, step count and active set of an IST run.

    Args:
        num_layers: number of layers ``L``.
        num_active: layers trained per step ``N_u``.
        sampling: ``"importance"`` (weights ``sigmoid(-s)``), ``"uniform"`` or
            ``"depth-aware"`` (importance weights, drawn clustered in depth).
        seed: seed of the private ``torch.Generator`` (global RNGs are never used).
        depth_window: window of the depth-aware draw (``None``: ``min(2 N_u, L)``).

    Example:
        >>> sampler = LayerSampler(8, 2, "uniform", seed=0)
        >>> sampler.active = sampler.draw_active(); len(sampler.active)
        2
        >>> state = sampler.state_dict()
        >>> other = LayerSampler(8, 2, "uniform", seed=1); other.load_state_dict(state)
        >>> other.draw_active() == sampler.draw_active()
        True
    """

    def __init__(self, num_layers: int, num_active: int, sampling: str, seed: int,
                 depth_window: int | None = None):
        if sampling not in _SAMPLINGS:
            raise ValueError(f"Invalid sampling: {sampling!r}; expected one of {_SAMPLINGS}")
        if depth_window is not None and not num_active <= depth_window <= num_layers:
            raise ValueError(
                f"Invalid depth_window: {depth_window}; expected an int in "
                f"[active layers={num_active}, layers={num_layers}]"
            )
        self.num_layers = num_layers
        self.num_active = num_active
        self.sampling = sampling
        self.depth_window = depth_window
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.scores = torch.zeros(num_layers, dtype=torch.float64)
        self.num_steps = 0
        self.active: list[int] = []

    # ------------------------------------------------------------------ draws
    def training_weights(self) -> torch.Tensor:
        """Per-layer weights of the training draw (``sigmoid(-s)``, or ones for uniform)."""
        if self.sampling == "uniform":
            return torch.ones(self.num_layers, dtype=torch.float64)
        return sampling_weights(self.scores, -1.0)

    def probabilities(self) -> torch.Tensor:
        """The training weights normalised to sum 1 (float32)."""
        weights = self.training_weights()
        return (weights / weights.sum()).to(torch.float32)

    def spread(self) -> dict[str, float]:
        """:func:`ist_optim.sampling.distribution_spread` of :meth:`probabilities`."""
        return distribution_spread(self.probabilities())

    def draw_active(self, accept: Callable[[list[int]], bool] | None = None,
                    redraws: int = 0) -> list[int]:
        """Draw the layers of the next step (sorted); does not change :attr:`active`.

        Args:
            accept: a predicate on a drawn set; ``None`` (default) takes the first draw.
            redraws: how many more draws to make while ``accept`` refuses (0: one draw,
                as without ``accept``). The first accepted set of the ``redraws + 1``
                draws is returned, else the last one, so every set the draw can produce
                keeps a non-zero probability. Every draw uses the private generator.

        Example:
            >>> sampler = LayerSampler(8, 2, "depth-aware", seed=0)
            >>> high = sampler.draw_active(lambda layers: min(layers) >= 4, redraws=8)
            >>> len(high)
            2
        """
        if isinstance(redraws, bool) or not isinstance(redraws, int) or redraws < 0:
            raise ValueError(f"Invalid redraws: {redraws!r}; expected an int >= 0")
        weights = self.training_weights()
        drawn = self._draw(weights)
        if accept is None:
            return drawn
        for _ in range(redraws):
            if accept(drawn):
                break
            drawn = self._draw(weights)
        return drawn

    def _draw(self, weights: torch.Tensor) -> list[int]:
        if self.sampling == "depth-aware":
            return sample_depth_aware(weights, self.num_active, self.generator,
                                      self.depth_window)
        return sample_layers(weights, self.num_active, self.generator)

    def draw_candidates(self, set_size: int, num_sets: int) -> list[list[int]]:
        """The paper's candidate sets: distinct sets drawn with weights ``sigmoid(s)``."""
        return sample_candidate_sets(sampling_weights(self.scores, +1.0), set_size, num_sets,
                                     self.generator)

    def set_scores(self, scores: torch.Tensor) -> None:
        if scores.shape != (self.num_layers,):
            raise ValueError(f"scores must have shape ({self.num_layers},), got "
                             f"{tuple(scores.shape)}")
        self.scores = scores.detach().to("cpu", torch.float64).clone()

    def fingerprint(self) -> dict[str, Any]:
        """Step, active set, scores, seed and a hash of the generator state (for checks
        that several processes hold the same sampler)."""
        generator = hashlib.sha256(self.generator.get_state().numpy().tobytes()).hexdigest()
        return {"num_steps": self.num_steps, "active_layers": list(self.active),
                "scores": self.scores.tolist(), "generator": generator[:16], "seed": self.seed}

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores.clone(),
            "generator_state": self.generator.get_state(),
            "active_layers": list(self.active),
            "num_steps": self.num_steps,
            "seed": self.seed,
        }

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Validate a :meth:`state_dict` entry completely, changing nothing.

        Raises:
            ValueError: naming the first entry that is missing or malformed.
        """
        for key in ("scores", "generator_state", "active_layers", "num_steps", "seed"):
            if key not in state:
                raise ValueError(f"IST checkpoint has no {key!r} entry; it is not an "
                                 "ISTOptimizer checkpoint or it is truncated")
        scores = state["scores"]
        if not isinstance(scores, torch.Tensor) or scores.shape != (self.num_layers,):
            raise _bad("scores", scores, f"a tensor of shape ({self.num_layers},)")
        if not scores.is_floating_point() or not torch.isfinite(scores).all():
            raise _bad("scores", scores, "finite floating-point scores")
        active = state["active_layers"]
        if not isinstance(active, Sequence) or isinstance(active, str):
            raise _bad("active_layers", active, "a list of layer indices")
        indices = [int(i) for i in active if isinstance(i, int) and not isinstance(i, bool)]
        if (len(indices) != len(active) or len(set(indices)) != len(indices)
                or not all(0 <= i < self.num_layers for i in indices) or not indices):
            raise _bad("active_layers", active,
                       f"distinct layer indices in [0, {self.num_layers})")
        steps = state["num_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise _bad("num_steps", steps, "an int >= 0")
        seed = state["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad("seed", seed, "an int")
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
        self.active = sorted(int(i) for i in state["active_layers"])
        self.num_steps = int(state["num_steps"])
        self.seed = int(state["seed"])
