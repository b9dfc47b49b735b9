"""``memory_report`` (ist_optim/memory/report.py): state bytes on the device and offloaded,
the coming step's trainable bytes, and the budget's decision."""

from __future__ import annotations

import torch
from torch import nn

from ist_optim.memory.report import memory_report
from ist_optim.memory.residency import StateResidency


def _trained_sgd() -> tuple[list[nn.Linear], torch.optim.Optimizer]:
    layers = [nn.Linear(4, 4) for _ in range(2)]  # 20 parameters each, 80 bytes
    opt = torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1,
                          momentum=0.9)
    for layer in layers:
        layer(torch.ones(1, 4)).sum().backward()
    opt.step()  # a momentum buffer per parameter: 80 bytes per layer
    return layers, opt


def test_without_a_budget_it_reports_state_and_trainable_bytes():
    layers, opt = _trained_sgd()
    residency = StateResidency(opt, "keep")
    report = memory_report(residency, list(layers[1].parameters()), [1], None)
    assert report == {"state_bytes_on_device": 160, "state_bytes_offloaded": 0,
                      "active_trainable_bytes": 80, "active_layers": [1],
                      "state_policy": "keep", "memory_budget": None,
                      "predicted_peak_bytes": None, "checkpointed_layers": []}


def test_offloaded_state_is_counted_apart():
    layers, opt = _trained_sgd()
    residency = StateResidency(opt, "offload")
    residency.deactivate(list(layers[0].parameters()))
    residency.synchronize()
    report = memory_report(residency, list(layers[1].parameters()), [1], None)
    assert report["state_bytes_offloaded"] == 80 and report["state_bytes_on_device"] == 80
    assert report["state_policy"] == "offload"


def test_a_budget_adds_its_report():
    class Budget:
        def report(self):
            return {"memory_budget": 1000, "predicted_peak_bytes": 900,
                    "checkpointed_layers": [0]}

    layers, opt = _trained_sgd()
    report = memory_report(StateResidency(opt, "keep"), [], [0], Budget())  # type: ignore[arg-type]
    assert (report["memory_budget"], report["predicted_peak_bytes"],
            report["checkpointed_layers"]) == (1000, 900, [0])
