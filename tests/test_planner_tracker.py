"""``LiveMemory`` (ist_optim/planner/tracker.py): live storage bytes, their peak and labels."""

from __future__ import annotations

import torch

from ist_optim.planner.tracker import LiveMemory


def test_counts_each_storage_once_and_frees_it_when_it_dies():
    with LiveMemory("cpu") as live:
        a = torch.ones(256)  # 1 KiB
        view = a[:128]  # same storage: nothing new
        assert live.current_bytes == 1024
        b = a + 1
        assert live.current_bytes == 2048
        del a, view
        assert live.current_bytes == 1024
        del b
    assert live.current_bytes == 0 and live.peak_bytes == 2048


def test_existing_tensors_count_from_the_start_and_other_devices_not_at_all():
    weights = torch.zeros(64)  # 256 bytes
    with LiveMemory("cpu", existing=[weights]) as live:
        assert live.current_bytes == 256
        meta = torch.empty(1000, device="meta")
        assert live.add(meta) is None and live.current_bytes == 256
    with LiveMemory("meta") as on_meta:
        x = torch.empty(1000, device="meta")
        y = torch.empty(10)  # a CPU tensor: not counted
    assert on_meta.peak_bytes == 4000 and x.numel() + y.numel() == 1010


def test_peak_breakdown_sums_the_storages_live_at_the_peak_by_label():
    with LiveMemory("cpu") as live:
        state = torch.ones(256)
        live.label(state, "state")
        assert live.label_of(state) == "state"
        temp = state * 3  # 1 KiB unlabelled: the peak
        del temp
        live.reset_peak()
        assert live.peak_breakdown() == {"state": 1024}
        grad = torch.ones(128)
        live.label(grad, "gradients")
    assert live.peak_breakdown() == {"state": 1024, "gradients": 512}
    assert live.label_of(torch.ones(1)) is None
