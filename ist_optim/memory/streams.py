"""``CudaStreams``: the stream, event and copy calls of state offloading, in one place.

:class:`~ist_optim.memory.residency.StateResidency` moves optimizer state between the
device and pinned host memory on a side stream. Every CUDA call it makes goes through one
object of this class, so the order of those calls (the update waits for a copy back, a
save waits for a copy out, a device buffer a side-stream copy uses is recorded on that
stream) can be checked on any machine: a test passes its own object with the same
methods (a fake that records the calls and delivers each copy only once the residency
waited for it, ``tests/fake_streams.py``) instead of this one.

Pinned host buffers need no recording: torch's caching host allocator records an event
on the copy's stream for every non-blocking copy from or to pinned memory, and reuses a
freed buffer only after that event.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

__all__ = ["CudaStreams"]


class CudaStreams:
    """The real CUDA calls behind :class:`~ist_optim.memory.residency.StateResidency`.

    Every method is one torch call; none synchronizes the host except
    :meth:`synchronize`.

    Example:
        >>> streams = CudaStreams()
        >>> streams.handles(torch.ones(2))  # host tensors are copied without streams
        False
    """

    def handles(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives on a device whose copies go through side streams."""
        return tensor.device.type == "cuda"

    def new_stream(self, device: torch.device) -> Any:
        """A new side stream on ``device``."""
        return torch.cuda.Stream(device=device)

    def current_stream(self, device: torch.device) -> Any:
        """The stream the training (forward, backward, update) runs on."""
        return torch.cuda.current_stream(device)

    def use(self, stream: Any) -> AbstractContextManager[Any]:
        """Context in which new kernels, copies and allocations go to ``stream``."""
        return torch.cuda.stream(stream)

    def wait_stream(self, waiter: Any, waited: Any) -> None:
        """Work issued on ``waiter`` from now on starts after the work issued on ``waited``."""
        waiter.wait_stream(waited)

    def record_event(self, stream: Any) -> Any:
        """An event that completes when the work issued on ``stream`` so far has."""
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, stream: Any, event: Any) -> None:
        """Work issued on ``stream`` from now on starts after ``event`` (no host wait)."""
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        """Block the host until ``event`` has completed."""
        event.synchronize()

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        """Keep the allocator from reusing ``tensor``'s device memory until the work
        issued on ``stream`` so far is done (``tensor`` was allocated on another stream)."""
        tensor.record_stream(stream)

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A pinned host buffer (the target of a copy out)."""
        return torch.empty(numel, dtype=dtype, pin_memory=True)

    def device_buffer(self, shape: torch.Size, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
        """A device buffer (the target of a copy back), allocated on the stream in use."""
        return torch.empty(shape, dtype=dtype, device=device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` into ``dst`` without blocking the host, on the stream in use."""
        dst.copy_(src, non_blocking=True)
