"""Estimation batches: where an importance round gets its batch, and how its loss is computed.

By default a forward pre-hook on the model keeps a reference to the most recent training
batch (no copy), so a round measures the suppressed losses on the batch the step just
trained on. Alternatively the user passes an iterable of batches, which is cycled.
:class:`BatchSource` is the one a suppression round asks for its next batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import check_int

__all__ = ["BatchCapture", "BatchCycler", "BatchSource", "CapturedCall", "default_loss_fn",
           "move_batch"]

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class CapturedCall:
    """The positional and keyword arguments of one ``model(...)`` call."""

    args: tuple
    kwargs: dict

    def as_batch(self) -> Any:
        """What a custom ``loss_fn`` receives: the kwargs dict for ``model(**batch)`` calls,
        the single argument for ``model(x)`` calls, else this object."""
        if not self.args:
            return self.kwargs
        if len(self.args) == 1 and not self.kwargs:
            return self.args[0]
        return self


class BatchCapture:
    """Keeps a reference to the arguments of the latest forward call of ``model``.

    ``num_items_in_batch`` (the HF Trainer's token count of the whole accumulated batch)
    is left out, so replaying the call gives the batch's own mean loss.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> capture = BatchCapture(net)
        >>> _ = net(torch.ones(3, 2))
        >>> capture.latest.as_batch().shape
        torch.Size([3, 2])
        >>> capture.remove()
    """

    def __init__(self, model: nn.Module):
        self.latest: CapturedCall | None = None
        self.enabled = True
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.enabled:
            # The HF Trainer passes the token count of the whole accumulated (and, under
            # DDP, global) batch so that micro-batch losses add up; replayed alone, that
            # would shrink the measured loss. A round measures this batch's mean loss.
            kept = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
            self.latest = CapturedCall(tuple(args), kept)

    def remove(self) -> None:
        self._handle.remove()


class BatchCycler:
    """Cycles through a re-iterable (list, DataLoader); counts batches for exact resume.

    Iterating runs under ``torch.random.fork_rng``: a ``DataLoader`` draws its base seed
    (and an unseeded shuffling sampler its order) from the global CPU RNG, which would
    otherwise shift the training run's dropout and data order whenever a round starts a
    new pass.
    """

    def __init__(self, batches: Iterable[Any]):
        if isinstance(batches, Iterator):
            raise TypeError(
                "importance_batches is a one-shot iterator; it would be exhausted after one "
                "pass. Pass a re-iterable such as a list of batches or a DataLoader."
            )
        self.batches = batches
        self.seen = 0
        self._iterator: Iterator[Any] | None = None

    def fast_forward(self, seen: int) -> None:
        """Position the cycle after ``seen`` batches (used when loading a checkpoint)."""
        self._iterator = None
        self.seen = 0
        for _ in range(seen):
            self.next()

    def next(self) -> Any:
        with torch.random.fork_rng(devices=[]):
            return self._next()

    def _next(self) -> Any:
        if self._iterator is not None:
            try:
                batch = next(self._iterator)
                self.seen += 1
                return batch
            except StopIteration:
                pass
        self._iterator = iter(self.batches)
        try:
            batch = next(self._iterator)
        except StopIteration:
            raise ValueError("importance_batches is empty; pass at least one batch") from None
        self.seen += 1
        return batch


def move_batch(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (tensor, mapping, list/tuple/namedtuple, nested) to
    ``device``; containers keep their type (a ``defaultdict`` its default factory, a
    ``BatchEncoding`` its encodings), the input is not changed.

    Example:
        >>> from collections import namedtuple
        >>> Pair = namedtuple("Pair", "x y")
        >>> move_batch(Pair(torch.ones(1), 2), torch.device("meta")).x.device
        device(type='meta')
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: move_batch(v, device) for k, v in batch.items()}
        if isinstance(batch, MutableMapping):
            out = copy.copy(batch)  # keeps the type and what its constructor would need
            out.update(moved)
            return out
        return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(move_batch(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def _loss_of(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    if loss is None:
        raise RuntimeError(
            "the model returned no loss for the importance batch (no `labels` in it?). "
            "Pass loss_fn=callable(model, batch) -> loss, or importance_batches with labels."
        )
    return loss


def default_loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` for a mapping; a captured call is replayed as it was made."""
    if isinstance(batch, CapturedCall):
        return _loss_of(model(*batch.args, **batch.kwargs))
    if isinstance(batch, Mapping):
        return _loss_of(model(**batch))
    raise TypeError(
        f"the default loss_fn calls model(**batch) and needs a mapping batch, got "
        f"{type(batch).__name__}; pass loss_fn=callable(model, batch) -> loss"
    )


class BatchSource:
    """The batch of each suppression round: user batches (cycled) or the latest training call.

    Args:
        model: the trained model; without ``batches`` a forward pre-hook on it keeps a
            reference to the arguments of its latest call (no copy).
        batches: a re-iterable of batches (list, DataLoader), cycled; ``None`` to capture.
    """

    def __init__(self, model: nn.Module, batches: Iterable[Any] | None):
        self._cycler = None if batches is None else BatchCycler(batches)
        self._capture = BatchCapture(model) if batches is None else None

    @property
    def captures(self) -> bool:
        """Whether the latest training call is captured (no batches were given)."""
        return self._capture is not None

    @property
    def seen(self) -> int:
        """Batches of the given iterable used so far (0 when capturing)."""
        return self._cycler.seen if self._cycler is not None else 0

    def next(self, device: torch.device, replay_call: bool) -> Any:
        """The next batch, moved to ``device``; ``replay_call``: a captured call is returned
        as it was made (for the default loss), else as what a custom ``loss_fn`` receives."""
        if self._cycler is not None:
            return move_batch(self._cycler.next(), device)
        latest = self._capture.latest if self._capture is not None else None
        if latest is None:
            raise RuntimeError(
                "an importance round is due but the model has not been called since the "
                "optimizer was built, so there is no batch to measure; call the model "
                "before step(), or pass importance_batches="
            )
        return latest if replay_call else latest.as_batch()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Capture nothing while the round's own forwards run."""
        if self._capture is None:
            yield
            return
        self._capture.enabled = False
        try:
            yield
        finally:
            self._capture.enabled = True

    def replace(self, batches: Iterable[Any], seen: int) -> None:
        """Cycle ``batches`` from now on, positioned after ``seen`` of them."""
        if self._cycler is not None:
            raise ValueError(
                "importance batches are already set (importance_batches= or an earlier "
                "set_importance_batches call); build the optimizer without them to set them here"
            )
        cycler = BatchCycler(batches)
        cycler.fast_forward(check_int("batches_seen", seen, 0))
        self.remove()
        self._cycler = cycler

    def fast_forward(self, seen: int) -> None:
        if self._cycler is not None:
            self._cycler.fast_forward(seen)

    def remove(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
