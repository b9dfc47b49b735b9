"""benchmarks/memory.py: which meter measures a configuration's peak."""

from __future__ import annotations

import torch
from conftest import load_benchmark

from ist_optim.cli.memory import PeakMemory

memory = load_benchmark("memory")


def test_a_cuda_device_with_an_index_is_measured_on_that_device():
    """``--device cuda:0`` measures the GPU (it measured the CPU's RSS before: only the
    string "cuda" was taken for CUDA)."""
    for device in ("cuda", "cuda:0", "cuda:1"):
        meter = memory.peak_meter(device)
        assert isinstance(meter, PeakMemory) and meter.device == torch.device(device)
    assert isinstance(memory.peak_meter("cpu"), memory.RssGrowth)


def test_rss_growth_is_measured_from_the_reset():
    meter = memory.RssGrowth()
    meter.reset()
    block = torch.ones(25_000_000)  # 100 MB
    block.add_(1)
    assert meter.peak_bytes() >= 50_000_000
    meter.synchronize()
