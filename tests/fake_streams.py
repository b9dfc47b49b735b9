"""A CPU stand-in for CUDA streams that delivers a copy only once the code waited for it.

:class:`FakeStreams` has the methods of :class:`ist_optim.memory.streams.CudaStreams` and
treats host tensors as device tensors, so ``StateResidency(..., streams=FakeStreams())``
runs its CUDA path on the CPU. It models the worst timing a GPU may show:

* a copy issued on a side stream is *in flight* until something orders it: its target
  holds poison (NaN, or 77 for integer dtypes) until then;
* :meth:`synchronize` on an event delivers every copy issued on that stream before the
  event (the host waited);
* :meth:`wait_event` of the current stream orders those copies before the current
  stream's next work: :meth:`before_update` (the optimizer's pre-step hook, see
  :meth:`watch`) delivers the ones that target device buffers. Copies into host buffers
  are delivered only by :meth:`synchronize`: the host reads them without a stream;
* a copy issued on a side stream that did not :meth:`wait_stream` for the current stream
  since its last update reads the state of before that update: it delivers poison;
* a side stream runs in order: a copy that reads the target of an earlier copy on the
  same stream gets what that copy delivers.

What the allocator would do with device buffers is checked from the call log instead:
:attr:`allocated_on` (buffers allocated on a side stream) and :attr:`recorded` (the
``record_stream`` calls); the tests assert that every buffer a side-stream copy reads or
fills is recorded on the stream that uses it next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class FakeStream:
    name: str
    issued: int = 0  # copies issued so far
    synced_update: int = 0  # the current stream's update count it last waited for


@dataclass(eq=False)
class FakeEvent:
    stream: FakeStream
    position: int  # copies issued on the stream before the event


@dataclass(eq=False)
class InFlight:
    stream: FakeStream
    position: int
    dst: torch.Tensor
    value: torch.Tensor  # what the copy delivers
    into_host: bool


def poison_like(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_floating_point():
        return torch.full_like(tensor, float("nan"))
    return torch.full_like(tensor, 77)


@dataclass(eq=False)
class FakeStreams:
    """Recording, delaying stand-in for :class:`~ist_optim.memory.streams.CudaStreams`."""

    log: list[tuple] = field(default_factory=list)
    current: FakeStream = field(default_factory=lambda: FakeStream("current"))
    in_flight: list[InFlight] = field(default_factory=list)
    updates: int = 0
    # (storage address, stream name) -> tensor, for every record_stream call (the tensor
    # is kept, so that its address is not reused by another one)
    recorded: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    # storage id -> (tensor, side stream name) of buffers allocated on a side stream
    allocated_on: dict[int, tuple[torch.Tensor, str]] = field(default_factory=dict)
    # storage id -> tensor of every host buffer handed out
    host_buffers: dict[int, torch.Tensor] = field(default_factory=dict)
    copies: int = 0
    stale_copies: int = 0  # side-stream copies that did not wait for the update
    raced_updates: int = 0  # updates that ran while a copy back was in flight
    _using: list[FakeStream] = field(default_factory=list)
    _ordered: dict[int, int] = field(default_factory=dict)  # id(stream) -> position

    # ---------------------------------------------------------------- CudaStreams' methods
    def handles(self, tensor: torch.Tensor) -> bool:
        return True

    def new_stream(self, device: torch.device) -> FakeStream:
        stream = FakeStream(f"side{len([e for e in self.log if e[0] == 'new_stream'])}")
        self.log.append(("new_stream", stream.name))
        return stream

    def current_stream(self, device: torch.device) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def use(self, stream: FakeStream) -> Iterator[FakeStream]:
        self._using.append(stream)
        try:
            yield stream
        finally:
            self._using.pop()

    def wait_stream(self, waiter: FakeStream, waited: FakeStream) -> None:
        self.log.append(("wait_stream", waiter.name, waited.name))
        if waited is self.current:
            waiter.synced_update = self.updates

    def record_event(self, stream: FakeStream) -> FakeEvent:
        self.log.append(("record_event", stream.name, stream.issued))
        return FakeEvent(stream, stream.issued)

    def wait_event(self, stream: FakeStream, event: FakeEvent) -> None:
        self.log.append(("wait_event", stream.name, event.stream.name, event.position))
        assert stream is self.current, "only the current stream waits for side streams here"
        key = id(event.stream)
        self._ordered[key] = max(self._ordered.get(key, 0), event.position)

    def synchronize(self, event: FakeEvent) -> None:
        self.log.append(("synchronize", event.stream.name, event.position))
        self._deliver(lambda c: c.stream is event.stream and c.position < event.position)

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self.log.append(("record_stream", stream.name))
        self.recorded[(_storage(tensor), stream.name)] = tensor

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = torch.empty(numel, dtype=dtype)
        self.host_buffers[_storage(buffer)] = buffer
        return buffer

    def device_buffer(self, shape: torch.Size, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        if self._using:
            self.allocated_on[_storage(buffer)] = (buffer, self._using[-1].name)
        return buffer

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not self._using:  # the current stream: in order with the training, at once
            dst.copy_(src)
            return
        stream = self._using[-1]
        self.copies += 1
        from_host = _storage(src) in self.host_buffers
        if not from_host and stream.synced_update < self.updates:
            # reads device state the current stream wrote, without waiting for it: the
            # state of before the update
            self.stale_copies += 1
            value = poison_like(src)
        else:
            value = self._pending_value(src, stream)
        self.in_flight.append(InFlight(stream, stream.issued, dst, value,
                                       _storage(dst) in self.host_buffers))
        stream.issued += 1
        dst.copy_(poison_like(dst))

    # ---------------------------------------------------------------- the test's side
    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Tell the fake when ``optimizer`` updates (on the current stream)."""
        optimizer.register_step_pre_hook(lambda *_: self.before_update())
        optimizer.register_step_post_hook(lambda *_: self.after_update())

    def before_update(self) -> None:
        """The current stream starts work: the copies it waited for that fill device
        buffers have arrived (and, the stream being in order, those before them)."""
        self.log.append(("update",))
        self._deliver(lambda c: not c.into_host
                      and c.position < self._ordered.get(id(c.stream), 0))
        if any(not c.into_host for c in self.in_flight):
            self.raced_updates += 1

    def after_update(self) -> None:
        self.updates += 1

    def unrecorded(self, tensors: list[torch.Tensor], stream: str) -> list[torch.Tensor]:
        """Those of ``tensors`` that were not recorded on ``stream``."""
        return [t for t in tensors if (_storage(t), stream) not in self.recorded]

    # ---------------------------------------------------------------- internals
    def _pending_value(self, src: torch.Tensor, stream: FakeStream) -> torch.Tensor:
        """What a copy of ``src`` issued now on ``stream`` reads: ``src``, or, where an
        earlier copy on the same stream still fills it, what that copy delivers."""
        value = src.detach().clone()
        for c in self.in_flight:
            if c.stream is stream and _storage(c.dst) == _storage(src):
                start = (src.data_ptr() - c.dst.data_ptr()) // src.element_size()
                value = c.value.reshape(-1)[start:start + src.numel()].view(src.shape).clone()
        return value

    def _deliver(self, which: Any) -> None:
        done = [c for c in self.in_flight if which(c)]
        for c in sorted(done, key=lambda c: c.position):
            c.dst.copy_(c.value)
        self.in_flight = [c for c in self.in_flight if not which(c)]


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()
