"""The device's peak memory over a stretch of work: the one peak meter of ``ist-finetune``,
the benchmarks and the library.

:class:`PeakMemory` reads the CUDA caching allocator's peak on a CUDA device (the model's
own, ``cuda:1`` included), the process's peak resident set size anywhere else. On Linux the
RSS peak (``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs``, so several runs
in one process each get their own peak; where that is not possible the meter reports the
process-lifetime peak (``ru_maxrss``) and says so through :attr:`PeakMemory.resettable`.
(Tensor by tensor accounting is the planner's :class:`ist_optim.planner.tracker.LiveMemory`.)
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

__all__ = ["PeakMemory"]

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in bytes; None where
    there is no such file."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakMemory:
    """Measure peak memory from :meth:`reset` to :meth:`peak_bytes`.

    Args:
        device: a CUDA device (``"cuda"``, ``"cuda:1"``: the model's) measures its
            ``torch.cuda.max_memory_allocated``; anything else the process's peak resident
            set size.

    Attributes:
        start_bytes: what was held at the last :meth:`reset` (allocated bytes on CUDA, the
            resident set elsewhere); :meth:`growth_bytes` is the peak above it.

    Example:
        >>> meter = PeakMemory("cpu")
        >>> meter.reset()
        >>> block = torch.ones(4_000_000)  # 16 MB
        >>> meter.peak_bytes() > meter.growth_bytes() >= 0
        True
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = True
        self.start_bytes = 0

    @property
    def kind(self) -> str:
        """What is measured, for table headers."""
        if self.cuda:
            return "peak CUDA allocated"
        return "peak RSS" if self.resettable else "process peak RSS"

    def reset(self) -> None:
        """Start a new measurement window."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.resettable = False
        self.start_bytes = _status_bytes("VmRSS") or 0

    def synchronize(self) -> None:
        """Wait for the work queued on the CUDA device (nothing on the CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_bytes(self) -> int:
        """Peak since the last :meth:`reset` (process-lifetime peak if it cannot reset)."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _status_bytes("VmHWM") if self.resettable else None
        if hwm is None:
            self.resettable = False
            return _ru_maxrss_bytes()
        return hwm

    def growth_bytes(self) -> int:
        """The peak above :attr:`start_bytes`: what the work since :meth:`reset` added."""
        return self.peak_bytes() - self.start_bytes
