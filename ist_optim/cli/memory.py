"""Peak memory of a stretch of work: CUDA allocator peak, or the process's peak RSS on CPU.

On Linux the RSS peak (``VmHWM``) can be reset by writing ``5`` to
``/proc/self/clear_refs``, so several runs in one process each get their own peak. Where
that is not possible the meter reports the process-lifetime peak (``ru_maxrss``) and says so
through :attr:`PeakMemory.resettable`.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

__all__ = ["PeakMemory"]

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _vm_hwm_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
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

    Example:
        >>> meter = PeakMemory("cpu")
        >>> meter.reset()
        >>> meter.peak_bytes() > 0
        True
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resettable = True

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
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.resettable = False

    def synchronize(self) -> None:
        """Wait for the work queued on the CUDA device (nothing on the CPU)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_bytes(self) -> int:
        """Peak since the last :meth:`reset` (process-lifetime peak if it cannot reset)."""
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _vm_hwm_bytes() if self.resettable else None
        if hwm is None:
            self.resettable = False
            return _ru_maxrss_bytes()
        return hwm
