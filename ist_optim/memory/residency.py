"""Optimizer-state residency: where the state of layers outside the active set lives.

Policies:

* ``"keep"``: state of every visited layer stays in the inner optimizer (the paper's
  behaviour; memory grows to the state of all layers).
* ``"offload"``: when a layer leaves the active set, its per-parameter state is taken out of
  the inner optimizer and moved to host memory (pinned on CUDA); it is moved back, tensor
  for tensor and bit for bit, when the layer is drawn again. On CUDA both directions run on
  a side stream and overlap the next forward/backward; the step waits for them.
* ``"drop"``: the state is deleted (like BAdam). A re-activated layer starts fresh: Adam
  moments are zero and its per-parameter ``step`` restarts at 0, so bias correction starts
  over for that layer.

Only the state of IST layers moves; the outside group (embeddings, heads) always keeps its
state. Every tensor of a parameter's state moves (bitsandbytes' quantization maps and
absmax tensors included); non-tensor entries are kept as they are. Paged bitsandbytes
optimizers manage their own paging and are refused for ``"offload"``/``"drop"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim import Optimizer

from ..config import STATE_POLICIES, StatePolicy
from .streams import CudaStreams

__all__ = ["STATE_POLICIES", "StateResidency", "resolve_state_policy", "state_bytes"]

BATCHED_COPY_BYTES = 1 << 20
"""State tensors smaller than this (per layer, device and dtype) are copied to and from
host memory together, in one copy; larger ones are copied one by one."""


def state_bytes(state: Iterable[dict[str, Any]]) -> int:
    """Bytes of every tensor in an iterable of per-parameter state dicts."""
    return sum(v.numel() * v.element_size() for entry in state for v in entry.values()
               if isinstance(v, torch.Tensor))


def resolve_state_policy(policy: StatePolicy | None, optimizer: Optimizer,
                         device: torch.device, *, sharded: bool = False) -> StatePolicy:
    """The state policy an optimizer uses: the user's ``policy``, else the default.

    The default is ``"offload"`` on CUDA and ``"keep"`` elsewhere (offloading to host
    memory from the host gains nothing); ``"keep"`` for a paged bitsandbytes ``optimizer``
    (it pages its own state, and refuses ``"offload"``) and for ``sharded`` (FSDP2
    DTensor) parameters on CUDA, whose state is already sharded across the ranks and
    whose placement pinned host copies would lose; an explicit ``"offload"`` is refused
    there. On the CPU "offload" moves nothing and works.

    Raises:
        ValueError: for ``"offload"`` with sharded parameters on CUDA.

    Example:
        >>> adam = torch.optim.Adam([torch.nn.Parameter(torch.ones(1))])
        >>> cuda, cpu = torch.device("cuda"), torch.device("cpu")
        >>> resolve_state_policy(None, adam, cuda), resolve_state_policy(None, adam, cpu)
        ('offload', 'keep')
        >>> resolve_state_policy(None, adam, cuda, sharded=True)
        'keep'
    """
    on_cuda = device.type == "cuda"
    if sharded and on_cuda and policy == "offload":
        raise ValueError(
            "state_policy='offload' does not support FSDP2 (DTensor) parameters on CUDA: its "
            "pinned host copies are plain tensors and lose the shard's placement. Use "
            "state_policy='keep' (the default here; FSDP2 already shards the state across "
            "ranks) or 'drop'"
        )
    if policy is not None:
        return policy
    if getattr(optimizer, "is_paged", False) or (sharded and on_cuda):
        return "keep"
    return "offload" if on_cuda else "keep"


class StateResidency:
    """Moves or drops the inner optimizer's per-parameter state as layers change.

    Args:
        optimizer: the inner optimizer, whose ``state`` is keyed by parameter.
        policy: ``"keep"``, ``"offload"`` or ``"drop"``.
        streams: the stream, event and copy calls of ``"offload"`` (default
            :class:`~ist_optim.memory.streams.CudaStreams`, the real CUDA ones; tests pass
            a recording fake).

    Ordering (``"offload"`` on CUDA): a copy out waits for the work issued on the current
    stream (the update that wrote the state); the update waits for the copies back
    (:meth:`wait`); reading host copies (:meth:`offloaded_state`, so every checkpoint)
    waits for the copies out (:meth:`synchronize`); a device buffer a side-stream copy
    reads or fills is recorded on the stream that uses it next, so the allocator does not
    hand it out again while the copy is in flight.

    Raises:
        ValueError: for an unknown policy, or ``"offload"``/``"drop"`` with a paged
            bitsandbytes optimizer.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.Adam([p])
        >>> p.grad = torch.ones(3); opt.step()
        >>> res = StateResidency(opt, "offload")
        >>> res.deactivate([p]); p in opt.state, res.offloaded_bytes() > 0
        (False, True)
        >>> res.activate([p]); p in opt.state
        True
    """

    def __init__(self, optimizer: Optimizer, policy: StatePolicy, *,
                 streams: CudaStreams | None = None):
        if policy not in STATE_POLICIES:
            raise ValueError(f"Invalid state_policy: {policy!r}; expected one of {STATE_POLICIES}")
        if policy != "keep" and getattr(optimizer, "is_paged", False):
            raise ValueError(
                f"state_policy={policy!r} cannot be used with the paged optimizer "
                f"{type(optimizer).__name__}: it pages its own state buffers, which are not "
                "released by moving or dropping them. Use state_policy='keep', or a non-paged "
                "optimizer such as bitsandbytes.optim.AdamW8bit."
            )
        self.optimizer = optimizer
        self.policy: StatePolicy = policy
        self.streams = streams if streams is not None else CudaStreams()
        # param -> {key: (value on host, device to copy it back to, or None: give it back
        # as it is (non-tensors, tensors that were in host memory already))}
        self._store: dict[torch.Tensor, dict[str, Any]] = {}
        # param -> the batch of one deactivate() call it was offloaded with (CUDA only):
        # {"params": set of params, "flats": [(host flat buffer, device, [(param, key,
        # offset, shape)])]}; a batch that comes back whole needs one copy per flat buffer
        self._batch_of: dict[torch.Tensor, dict[str, Any]] = {}
        self._side: dict[torch.device, Any] = {}  # one side stream per device
        # device -> event after the last copies issued on its side stream (the stream runs
        # in order, so the last event covers every earlier copy); kept until the host has
        # waited for it (synchronize), also when the current stream already did (wait)
        self._events: dict[torch.device, Any] = {}
        self._waited: set[torch.device] = set()  # events the current stream waits for

    # ------------------------------------------------------------------ transitions
    def deactivate(self, params: Iterable[torch.Tensor]) -> None:
        """Take the state of ``params`` out of the optimizer (offload or drop it).

        Pass one layer's parameters per call: on CUDA their state tensors are copied to
        host memory with one copy per (device, dtype), and come back the same way.
        """
        if self.policy == "keep":
            return
        params = list(params)
        # stored first, popped last: an interrupt in between leaves the state in both places
        # (the next deactivate stores it again), never in neither
        entries = [(p, entry) for p in params if (entry := self.optimizer.state.get(p))]
        if entries and self.policy == "offload":
            self._offload(entries)
            self._record_events()
        for p in params:
            self.optimizer.state.pop(p, None)

    def _offload(self, entries: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        on_device: dict[tuple[torch.device, torch.dtype], list] = {}
        for p, entry in entries:
            stored = self._store.setdefault(p, {})
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and self.streams.handles(value):
                    on_device.setdefault((value.device, value.dtype), []).append((p, key, value))
                else:
                    stored[key] = (value, None)  # host memory already, or not a tensor
        if not on_device:
            return
        batch: dict[str, Any] = {"params": {p for p, _ in entries}, "flats": []}
        for device in {device for device, _ in on_device}:
            # the copies read the state the update (on the current stream) just wrote
            self.streams.wait_stream(self._side_stream(device),
                                     self.streams.current_stream(device))
        for (device, dtype), items in on_device.items():
            # small tensors travel together (one copy); a large one alone, so that no
            # device buffer of the layer's whole state is ever allocated for the copy
            small = [item for item in items
                     if item[2].numel() * item[2].element_size() < BATCHED_COPY_BYTES]
            chunks = [small] if small else []
            chunks += [[item] for item in items
                       if item[2].numel() * item[2].element_size() >= BATCHED_COPY_BYTES]
            for chunk in chunks:
                batch["flats"].append(self._copy_out(chunk, device, dtype))
        for p in batch["params"]:
            self._batch_of[p] = batch

    def _copy_out(self, chunk: list, device: torch.device, dtype: torch.dtype) -> tuple:
        """One pinned host buffer and one copy for the state tensors of ``chunk``."""
        streams, stream = self.streams, self._side_stream(device)
        total = sum(value.numel() for _, _, value in chunk)
        with streams.use(stream):
            host = streams.host_buffer(total, dtype)
            if len(chunk) == 1:
                flat = chunk[0][2].reshape(-1)
            else:  # allocated on the side stream, which alone uses it
                flat = torch.cat([value.reshape(-1) for _, _, value in chunk])
            streams.copy(host, flat)
        layout, offset = [], 0
        for p, key, value in chunk:
            # allocated on the current stream and released by the optimizer right after:
            # not reused before the side stream's copy of it is done
            streams.record_stream(value, stream)
            self._store[p][key] = (host[offset:offset + value.numel()].view(value.shape), device)
            layout.append((p, key, offset, value.shape))
            offset += value.numel()
        return host, device, layout

    def activate(self, params: Iterable[torch.Tensor]) -> None:
        """Give offloaded state of ``params`` back to the optimizer, on its original device."""
        if self.policy != "offload":
            return
        wanted = [p for p in params if p in self._store]
        wanted_set = set(wanted)
        whole = []  # batches coming back complete: one copy per flat buffer
        for p in wanted:
            batch = self._batch_of.get(p)
            if (batch is not None and all(b is not batch for b in whole)
                    and batch["params"] <= wanted_set):
                whole.append(batch)
        restored: dict[torch.Tensor, dict[str, Any]] = {}
        for batch in whole:
            for host, device, layout in batch["flats"]:
                moved = self._to_device((host, device))
                for p, key, offset, shape in layout:
                    restored.setdefault(p, {})[key] = moved[offset:offset + shape.numel()
                                                            ].view(shape)
        for p in wanted:  # given back first, then forgotten (see deactivate)
            done = restored.get(p, {})
            self.optimizer.state[p] = {
                k: done[k] if k in done else self._to_device(v) for k, v in self._store[p].items()}
            del self._store[p]
            self._batch_of.pop(p, None)
        self._record_events()

    def _side_stream(self, device: torch.device) -> Any:
        if device not in self._side:
            self._side[device] = self.streams.new_stream(device)
        return self._side[device]

    def _to_device(self, stored: tuple[Any, torch.device | None]) -> Any:
        value, device = stored
        if device is None:
            return value
        streams, stream = self.streams, self._side_stream(device)
        with streams.use(stream):
            moved = streams.device_buffer(value.shape, value.dtype, device)
            streams.copy(moved, value)
        # allocated on the side stream, used by the update on the current stream
        streams.record_stream(moved, streams.current_stream(device))
        return moved

    def _record_events(self) -> None:
        """After copies were issued: one event per side stream, marking their end."""
        for device, stream in self._side.items():
            self._events[device] = self.streams.record_event(stream)
            self._waited.discard(device)

    def wait(self) -> None:
        """Make the current stream wait for the copies in flight (before the update); the
        host does not wait, and :meth:`synchronize` still can."""
        for device, event in self._events.items():
            if device not in self._waited:
                self.streams.wait_event(self.streams.current_stream(device), event)
                self._waited.add(device)

    def synchronize(self) -> None:
        """Block the host until every copy in flight is done (before reading state)."""
        for event in self._events.values():
            self.streams.synchronize(event)
        self._events.clear()
        self._waited.clear()

    # ------------------------------------------------------------------ accounting / io
    @contextmanager
    def full_state(self) -> Iterator[Optimizer]:
        """The inner optimizer with every offloaded state entry put back, for reading
        (``state_dict()``, the DCP helpers, ``memory_report()``).

        Inside the context ``optimizer.state`` holds the state of every layer (offloaded
        entries as their host tensors); on exit the offloaded entries leave it again.

        Example:
            >>> import torch
            >>> p = torch.nn.Parameter(torch.ones(2)); opt = torch.optim.Adam([p])
            >>> p.grad = torch.ones(2); opt.step()
            >>> res = StateResidency(opt, "offload"); res.deactivate([p])
            >>> with res.full_state() as full:
            ...     p in full.state
            True
            >>> p in opt.state
            False
        """
        offloaded = self.offloaded_state()
        self.optimizer.state.update(offloaded)
        try:
            yield self.optimizer
        finally:
            for param in offloaded:
                self.optimizer.state.pop(param, None)

    def offloaded_bytes(self) -> int:
        return state_bytes(self._host_entries().values())

    def offloaded_state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """The offloaded per-parameter state as plain host tensors (synchronizes first).

        A parameter whose state the optimizer holds too (a switch interrupted between
        storing and removing it) is left out: the optimizer's entry is the live one.
        """
        self.synchronize()
        return self._host_entries()

    def _host_entries(self) -> dict[torch.Tensor, dict[str, Any]]:
        return {p: {k: v for k, (v, _) in entry.items()} for p, entry in self._store.items()
                if p not in self.optimizer.state}

    def clear(self) -> None:
        """Forget every offloaded entry (a checkpoint load put them in the optimizer)."""
        self.synchronize()
        self._store.clear()
        self._batch_of.clear()
