"""Importance estimators: what turns measurements into score updates.

All estimators feed the same score update of :mod:`ist_optim.importance.scores`
(``s_i <- s_i + eta * sum_k A_k 1[i in S_k] p_i (1 - p_i)``, ``p = sigmoid(s)``) and the
same sampling; they differ in what is measured and how it becomes the advantages ``A_k``.

``"paper"`` (the default)
    ``A_k = exp(-l_k) - mean_j exp(-l_j)`` over the K suppressed losses. Its size depends
    on the loss level: at a loss near 3.4, rewards differ by about ``1e-3`` between
    candidate sets, so ``eta = 10`` moves scores by about ``1e-4`` a round and sampling
    stays practically uniform.

``"normalized"``
    The same K suppressed losses, standardized so that a round's step means the same at
    any loss level, and scores that forget old rounds so they stay bounded. With
    ``mean`` the mean of the round's losses and ``sigma_t`` their (population) standard
    deviation::

        m_t = sigma_1                                  (first round)
        m_t = beta * m_{t-1} + (1 - beta) * sigma_t    (later rounds, beta = 0.9)
        c_t = max(sigma_t, m_t)                        (the scale)
        z_k = (mean - l_k) / c_t                       (0 when c_t = 0)
        A_k = tau * z_k                                (tau = 0.1)
        s  <- rho * s                                  (rho = 0.9), then the update above

    A set whose suppression hurts least gets a positive advantage, so its layers' scores
    rise and they are trained less. ``c_t >= sigma_t`` gives ``sum_k z_k^2 <= K``, so
    one round moves a score by at most ``eta * tau * K / 4`` (0.75 at the defaults)
    whatever the loss level (``eta * tau * sqrt(K - 1) / 4`` for singleton sets), and the
    retention ``rho`` bounds every score by that step over ``1 - rho``; in practice
    scores settle within about +-2 (a sampling max/min ratio of a few units) and reflect
    the last ``1 / (1 - rho) = 10`` rounds. ``tau`` makes the paper's ``eta = 10`` move a
    score by about 0.25 per round and unit of standardized advantage. The running mean
    ``m_t`` (saved in checkpoints) makes a round whose losses differ less than usual move
    scores less: a quiet round is weak evidence.

``"first-order"``
    No extra forward pass. Scaling a layer's adapter output ``y`` by ``lambda`` changes
    the loss by about ``(lambda - 1) * <dL/dy, y>``; the inner product comes out of the
    training backward pass for every layer the backward reaches (frozen layers above the
    lowest trained layer included; layers below it get no estimate that step). For a
    peft LoRA adapter ``y = s * B h`` with ``h = A dropout(x)``, and since ``B`` is linear
    without bias, ``<dL/dy, y> = <dL/dh, h>``: a tensor hook on ``h`` (the input of
    ``lora_B``, rank-sized, already kept by autograd when ``B`` trains) gives it with one
    small dot product per adapter call. For full fine-tuning (residual mode) a hook on
    each block output ``o = x + f(x)`` gives ``<dL/do, o - x>``. Between two rounds, the
    per-step values are averaged per layer over the steps that reached it, giving the
    predicted suppression loss change ``d_i = (lambda - 1) * mean <dL/dy_i, y_i>``. Each
    reached layer is then a singleton candidate set ``{i}`` with "loss" ``d_i`` and the
    ``"normalized"`` update above (``K`` = the number of reached layers). At a minimum
    of the loss along the adapter's scale the linear term vanishes, so the estimate is
    most informative while adapters are still moving (docs/benchmarks.md measures its
    agreement with suppression).

Example:
    >>> import torch
    >>> scale = RunningScale()
    >>> normalized_advantages(torch.tensor([3.0, 3.5, 4.0]), scale)
    tensor([ 0.1225,  0.0000, -0.1225], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ..config import ISTConfig
from ..core.compile import is_compiled_block
from .scores import score_update
from .suppression import find_tuner_layers

__all__ = [
    "FirstOrderProbe",
    "RunningScale",
    "normalized_advantages",
    "normalized_score_update",
    "predicted_suppression_deltas",
]

ADVANTAGE_SCALE: float = ISTConfig.advantage_scale
"""``tau``: standardized advantages are scaled so that eta = 10 moves a score by about
``eta * tau / 4 = 0.25`` per unit of standardized advantage and round."""
SCORE_RETENTION: float = ISTConfig.score_retention
"""``rho``: scores keep this fraction of their value at each normalized round."""


@dataclass
class RunningScale:
    """Running scale ``m_t`` of the per-round loss spread (see the module docstring).

    Attributes:
        decay: ``beta``, the weight of the past in the running mean.
        value: ``m_t``; meaningless while ``rounds == 0``.
        rounds: rounds seen.

    Example:
        >>> scale = RunningScale(decay=0.5)
        >>> scale.update(2.0), scale.update(1.0), scale.update(4.0)
        (2.0, 1.5, 4.0)
    """

    decay: float = ISTConfig.scale_decay
    value: float = 0.0
    rounds: int = 0

    def update(self, round_std: float) -> float:
        """Fold in this round's spread ``sigma_t``; return the scale ``max(sigma_t, m_t)``."""
        if not math.isfinite(round_std) or round_std < 0:
            raise ValueError(f"round spread must be finite and >= 0, got {round_std}")
        if self.rounds == 0:
            self.value = round_std
        else:
            self.value = self.decay * self.value + (1.0 - self.decay) * round_std
        self.rounds += 1
        return max(round_std, self.value)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "value": self.value, "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.value = float(state["value"])
        self.rounds = int(state["rounds"])


def normalized_advantages(
    losses: torch.Tensor, scale: RunningScale, advantage_scale: float = ADVANTAGE_SCALE
) -> torch.Tensor:
    """``A_k = tau * (mean - l_k) / max(sigma_t, m_t)``; updates ``scale`` in place.

    Args:
        losses: the round's K losses (suppressed losses, or predicted loss changes).
        scale: the running scale, updated with this round's standard deviation.
        advantage_scale: ``tau``.

    Returns:
        float64 advantages, summing to zero, with ``sum A_k^2 <= K tau^2``.
    """
    losses64 = losses.detach().to(torch.float64).flatten()
    if losses64.numel() == 0:
        raise ValueError("normalized_advantages needs at least one loss")
    if not torch.isfinite(losses64).all():
        raise ValueError(f"losses must be finite, got {losses64.tolist()}")
    centered = losses64.mean() - losses64
    spread = float(centered.pow(2).mean().sqrt())
    if spread <= 16 * torch.finfo(torch.float64).eps * float(losses64.abs().max()):
        spread, centered = 0.0, torch.zeros_like(centered)  # equal up to rounding
    c = scale.update(spread)
    if c == 0.0:
        return torch.zeros_like(losses64)
    return advantage_scale * centered / c


def normalized_score_update(
    scores: torch.Tensor,
    candidate_sets: Sequence[Sequence[int]],
    losses: torch.Tensor,
    scale: RunningScale,
    step_size: float,
    *,
    advantage_scale: float = ADVANTAGE_SCALE,
    retention: float = SCORE_RETENTION,
) -> torch.Tensor:
    """One round of the ``"normalized"`` / ``"first-order"`` estimators.

    ``s <- score_update(rho * s, sets, A, eta)`` with ``A`` from
    :func:`normalized_advantages`, ``tau = advantage_scale`` and ``rho = retention``.

    Example:
        >>> s = torch.zeros(4, dtype=torch.float64)
        >>> normalized_score_update(s, [[0, 1], [2, 3]], torch.tensor([1.0, 2.0]),
        ...                         RunningScale(), 10.0).tolist()
        [0.25, 0.25, -0.25, -0.25]
    """
    advantages = normalized_advantages(losses, scale, advantage_scale)
    return score_update(retention * scores, candidate_sets, advantages, step_size)


def predicted_suppression_deltas(
    sums: torch.Tensor, counts: torch.Tensor, factor: float
) -> tuple[list[int], torch.Tensor]:
    """First-order loss change of damping each layer's response by ``factor``.

    Args:
        sums: per-layer sums of ``<dL/dy_i, y_i>`` over the steps since the last round.
        counts: per-layer number of steps that contributed to ``sums`` (averaged over
            ranks, so possibly fractional).
        factor: lambda.

    Returns:
        The layers with at least one contribution, and ``(factor - 1) * sums / counts``
        for them (positive: damping the layer would raise the loss).

    Example:
        >>> predicted_suppression_deltas(torch.tensor([2.0, 0.0, -1.0]),
        ...                              torch.tensor([2, 0, 1]), 0.25)
        ([0, 2], tensor([-0.7500,  0.7500], dtype=torch.float64))
    """
    reached = [i for i in range(counts.numel()) if float(counts[i]) > 0]
    sums = sums.detach().cpu().to(torch.float64)
    return reached, (factor - 1.0) * sums[reached] / counts[reached].to(torch.float64)


def _dot(grad: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if grad.dtype not in (torch.float32, torch.float64):
        grad, value = grad.float(), value.float()
    return torch.dot(grad.reshape(-1), value.reshape(-1))


def _check_plain_lora(module: nn.Module, layer: int) -> None:
    lora_b = getattr(module, "lora_B", None)
    variants = getattr(module, "lora_variant", None) or {}
    ok = isinstance(lora_b, nn.ModuleDict) and len(lora_b) > 0 and not variants
    if ok:
        ok = all(getattr(b, "bias", None) is None for b in lora_b.values())
    if not ok:
        raise ValueError(
            f"estimator='first-order' supports plain peft LoRA adapters (no DoRA or other "
            f"variant, no lora_bias, no embedding LoRA); layer {layer} holds a "
            f"{type(module).__name__} it cannot read. Use estimator='normalized' instead."
        )


class FirstOrderProbe:
    """Accumulates ``<dL/dy_i, y_i>`` per layer from the training backward pass.

    Hooks fire only while grad mode is on and the hooked tensor requires grad, so
    no-grad forwards (evaluation, importance rounds) cost nothing and add nothing.
    Call :meth:`end_step` once per optimizer step and :meth:`take` once per round.

    Args:
        blocks: the block module of each layer.
        mode: ``"adapters"`` (hooks on the input of every peft ``lora_B``) or
            ``"residual"`` (hooks on each block's output), as resolved by
            :class:`ist_optim.Suppressor`.

    Raises:
        ValueError: for an adapter type other than plain LoRA in adapters mode, or blocks
            compiled by :func:`ist_optim.compile_blocks` in adapters mode.

    Example:
        >>> blocks = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(2))
        >>> probe = FirstOrderProbe(list(blocks), "residual")
        >>> x = torch.ones(1, 3, requires_grad=True)
        >>> blocks[1](blocks[0](x)).sum().backward()
        >>> probe.end_step()
        >>> sums, counts = probe.take()
        >>> counts.tolist()
        [1, 1]
        >>> probe.remove()
    """

    def __init__(self, blocks: Sequence[nn.Module], mode: str):
        if mode not in ("adapters", "residual"):
            raise ValueError(f"mode must be 'adapters' or 'residual', got {mode!r}")
        self.num_layers = len(blocks)
        self.mode = mode
        self._sums: torch.Tensor | None = None  # on the device of the grads
        self._counts = torch.zeros(self.num_layers, dtype=torch.int64)
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._handles: list[Any] = []
        if mode == "residual":
            for layer, block in enumerate(blocks):
                self._handles.append(block.register_forward_hook(
                    partial(self._residual_hook, layer), with_kwargs=True))
            return
        targets = []  # validate every adapter before registering any hook
        for layer, block in enumerate(blocks):
            if is_compiled_block(block):
                raise ValueError(
                    f"layer {layer} was compiled by compile_blocks; estimator='first-order' "
                    "hooks every lora_B inside the blocks, which would be traced into the "
                    "compiled block and recompile it per layer: use estimator='normalized' "
                    "(or 'paper') with compiled blocks"
                )
            for tuner in find_tuner_layers(block):
                _check_plain_lora(tuner, layer)
                targets += [(layer, b) for b in tuner.lora_B.values()]  # type: ignore[union-attr]
        for layer, lora_b in targets:
            self._handles.append(lora_b.register_forward_pre_hook(
                partial(self._adapter_hook, layer)))

    # hooks --------------------------------------------------------------------------
    def _add(self, layer: int, grad: torch.Tensor, value: torch.Tensor,
             base: torch.Tensor | None = None) -> None:
        """Backward hook body: one dot product, kept until :meth:`end_step` folds it in."""
        dot = _dot(grad, value)
        if base is not None:
            dot = dot - _dot(grad, base)
        self._pending.append((layer, dot))

    def _adapter_hook(self, layer: int, _module: nn.Module, args: tuple) -> None:
        hidden = args[0] if args else None
        if not (torch.is_grad_enabled() and isinstance(hidden, torch.Tensor)
                and hidden.requires_grad):
            return
        value = hidden.detach()
        hidden.register_hook(lambda grad: self._add(layer, grad, value))

    def _residual_hook(self, layer: int, _module: nn.Module, args: tuple, kwargs: dict,
                       output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        hidden_in = args[0] if args else kwargs.get("hidden_states")
        out = output[0] if isinstance(output, tuple | list) else output
        if not (isinstance(hidden_in, torch.Tensor) and isinstance(out, torch.Tensor)
                and out.shape == hidden_in.shape):
            raise RuntimeError(
                f"estimator='first-order' in residual mode needs blocks whose first input and "
                f"output are tensors of one shape; layer {layer} ({type(_module).__name__}) "
                "is not. Use estimator='normalized' instead."
            )
        if not out.requires_grad:
            return
        value, base = out.detach(), hidden_in.detach()
        out.register_hook(lambda grad: self._add(layer, grad, value, base))

    # bookkeeping --------------------------------------------------------------------
    def end_step(self) -> None:
        """Add this step's dot products to the sums (one ``index_add_``, no device sync) and
        count one step for every layer the backward reached since the last call."""
        if not self._pending:
            return
        layers = [layer for layer, _ in self._pending]
        values = torch.stack([dot.to(torch.float64) for _, dot in self._pending])
        self._pending = []
        if self._sums is None:
            self._sums = torch.zeros(self.num_layers, dtype=torch.float64, device=values.device)
        self._sums = self._sums.to(values.device)
        self._sums.index_add_(0, torch.tensor(layers, device=values.device), values)
        for layer in set(layers):
            self._counts[layer] += 1

    def discard_step(self) -> None:
        """Drop the dot products since the last :meth:`end_step` (a skipped step's)."""
        self._pending = []

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(sums, counts)`` on CPU since the last :meth:`take`, and reset them."""
        sums = self._current_sums()
        counts = self._counts.clone()
        self._sums = None
        self._counts.zero_()
        return sums, counts

    def _current_sums(self) -> torch.Tensor:
        if self._sums is None:
            return torch.zeros(self.num_layers, dtype=torch.float64)
        return self._sums.detach().cpu().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self._current_sums(), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`. Both tensors come to the host, where :meth:`take`
        returns them: accelerate's ``prepare`` and the Trainer's ``map_location`` may have
        moved them to the accelerator."""
        self._sums = state["sums"].to("cpu", torch.float64).clone()
        self._counts = state["counts"].to("cpu", torch.int64).clone()
        self._pending = []

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
