"""benchmarks/memory.py: which meter measures a configuration's peak."""

from __future__ import annotations

import torch

from benchmarks.memory import peaks as memory


def test_the_cpu_peak_is_the_growth_since_the_reset_and_cuda_the_allocators(monkeypatch):
    """On the CPU a configuration's peak is what it added to the process after its model
    was built; on a CUDA device (``cuda:1`` included: that device) the allocator's peak."""
    meter = memory.PeakMemory("cpu")
    meter.reset()
    block = torch.ones(25_000_000)  # 100 MB
    block.add_(1)
    assert 75_000_000 <= memory.peak_of(meter) < meter.peak_bytes()
    for name, value in (("reset_peak_memory_stats", None), ("memory_allocated", 3),
                        ("max_memory_allocated", 7)):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, value=value: value)
    meter = memory.PeakMemory("cuda:1")
    meter.reset()
    assert meter.device == torch.device("cuda", 1) and memory.peak_of(meter) == 7
