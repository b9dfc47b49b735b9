"""Live tensor memory, allocation by allocation: a dispatch mode that sees every new storage.

:class:`LiveMemory` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that
records each storage an operator allocates and forgets it when the storage is freed (a weak
reference with a callback, as torch's own ``MemTracker`` does). Unlike ``MemTracker`` it
registers nothing on modules or parameters, so frozen parameters, peft adapters and
optimizer wrappers need no special care, and it works on real devices and on the ``meta``
device alike (meta storages have sizes), which is what the estimator runs one decoder block
on.

The peak is kept as the list of storages live at that moment, each with a serial number, so
a caller can label them afterwards (weights, gradients, optimizer state, saved activations)
with :meth:`LiveMemory.label`, even when the label is only known after the peak (a gradient
is allocated by an operator and only then stored in ``.grad``).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["LiveMemory"]

class LiveMemory(TorchDispatchMode):
    """Track the bytes of live tensor storages on one device, and their peak.

    Args:
        device: only storages on this device count (``"meta"`` for shape-only runs).
        existing: tensors alive before the mode starts (parameters, optimizer state, ...):
            they count from the start.

    Example:
        >>> with LiveMemory("cpu") as live:
        ...     a = torch.ones(256)          # 1 KiB
        ...     b = a * 2                    # 1 KiB more
        ...     del a
        >>> live.peak_bytes, live.current_bytes
        (2048, 1024)
    """

    def __init__(self, device: str | torch.device, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.device = torch.device(device)
        self._serials = itertools.count()
        self._info: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> (serial, bytes)
        self._refs: dict[int, weakref.ref] = {}
        self._sizes: dict[int, int] = {}
        self._labels: dict[int, str] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self._peak_serials: list[int] = []
        for tensor in existing:
            self.add(tensor)
        self._mark_peak()

    def _same_device(self, tensor: torch.Tensor) -> bool:
        device = tensor.device
        if device.type != self.device.type:
            return False
        return self.device.index is None or device.index == self.device.index

    def add(self, tensor: torch.Tensor) -> int | None:
        """Count ``tensor``'s storage if it is new; return its serial (None: other device)."""
        if not isinstance(tensor, torch.Tensor) or not self._same_device(tensor):
            return None
        storage = tensor.untyped_storage()
        known = self._info.get(storage)
        if known is not None:
            return known[0]
        serial = next(self._serials)
        size = storage.nbytes()
        if self.device.type == "cuda":  # the caching allocator hands out 512-byte blocks
            size = -(-size // 512) * 512
        self._info[storage] = (serial, size)
        self._sizes[serial] = size
        self._refs[serial] = weakref.ref(storage, lambda _ref, s=serial: self._free(s))
        self.current_bytes += size
        if self.current_bytes > self.peak_bytes:
            self._mark_peak()
        return serial

    def _free(self, serial: int) -> None:
        self._refs.pop(serial, None)
        self.current_bytes -= self._sizes.get(serial, 0)

    def _mark_peak(self) -> None:
        self.peak_bytes = self.current_bytes
        self._peak_serials = list(self._refs)

    def label(self, tensor: torch.Tensor, name: str) -> None:
        """Label ``tensor``'s storage (counting it first if it is new)."""
        serial = self.add(tensor)
        if serial is not None:
            self._labels[serial] = name

    def label_of(self, tensor: torch.Tensor) -> str | None:
        """The label of ``tensor``'s storage (None: unlabelled or not tracked)."""
        known = self._info.get(tensor.untyped_storage()) if self._same_device(tensor) else None
        return None if known is None else self._labels.get(known[0])

    def reset_peak(self) -> None:
        """Start a new peak window at the current live bytes."""
        self._mark_peak()

    def peak_breakdown(self, default: str = "transient") -> dict[str, int]:
        """Bytes live at the peak, summed by label (unlabelled storages under ``default``)."""
        out: dict[str, int] = {}
        for serial in self._peak_serials:
            name = self._labels.get(serial, default)
            out[name] = out.get(name, 0) + self._sizes[serial]
        return out

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        for item in tree_flatten(result)[0]:
            if isinstance(item, torch.Tensor):
                self.add(item)
        return result
