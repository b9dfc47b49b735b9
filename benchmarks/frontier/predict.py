"""The planner's predicted step times of the frontier's methods, beside the measured ones.

Each timed method at each budget is asked of :class:`ist_optim.MemoryPlanner` as it ran
(SmolLM2-135M's config, float32, the batch of the rows, the loop keeping only the loss):
``lora+gc`` every block checkpointed with input gradients down to the embeddings (peft
with the model's gradient checkpointing), ``lora`` none, ``lora+budget`` and
``apollo-mini+budget`` the lowest blocks, as many as the run checkpointed (with every layer
active :class:`~ist_optim.CheckpointPolicy` takes them from the bottom), ``lora+every-k``
every k-th block, ``ist-sparse+budget`` the mean over 200 uniform draws of its active
count, each with the blocks the policy picks at the budget, ``apollo-mini+gc`` full
fine-tuning with every block checkpointed. Priced on the CPU as measured
(:meth:`ist_optim.Device.measure`, one thread: a ``{"phase": "device"}`` row), each as a
ratio to ``lora+gc``'s predicted time at the budget, which is what the measured ratios are.
APOLLO-Mini's update is priced as AdamW's (its projections are not modelled).

Example:
    >>> round(error_percent(1.1, 1.0), 6)
    10.0
"""

from __future__ import annotations

import statistics
import warnings
from typing import Any

import torch

from ist_optim import CheckpointPolicy, Device, MemoryPlanner
from ist_optim.planner.shapes import load_config
from ist_optim.sampling.draws import sample_layers

from ..benchkit.models import LORA_TARGETS
from .methods import BASELINE, BUDGETED, every_kth

#: Draws of the IST method's active set the prediction averages over.
DRAWS = 200
#: Layers the IST method trains per step (the budget study's ``lora+uniform+budget``).
IST_ACTIVE = 7


def error_percent(predicted: float, measured: float) -> float:
    """How far ``predicted`` is from ``measured``, in percent of ``measured``."""
    return (predicted / measured - 1.0) * 100.0


def device_of_rows(rows: list[dict[str, Any]]) -> Device | None:
    """The measured CPU (the last ``{"phase": "device"}`` row), or None."""
    row = next((r for r in reversed(rows) if r.get("phase") == "device"), None)
    if row is None:
        return None
    return Device(row["name"], row["flops_per_second"], row["bytes_per_second"])


def device_row(threads: int) -> dict[str, Any]:
    """This machine measured with ``threads`` torch threads, as a row."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = Device.measure(f"this CPU, {threads} thread(s)")
    finally:
        torch.set_num_threads(before)
    return {"phase": "device", "name": device.name, "threads": threads,
            "flops_per_second": device.flops_per_second,
            "bytes_per_second": device.bytes_per_second}


def planners(model: str, batch_size: int, seq_len: int, rank: int) -> dict[str, MemoryPlanner]:
    """LoRA's and APOLLO-Mini's planners for the rows' shape."""
    config = load_config(model)
    common = {"batch_size": batch_size, "seq_len": seq_len, "dtype": torch.float32,
              "keep_logits": False}
    return {"lora": MemoryPlanner(config, lora_rank=rank, lora_targets=LORA_TARGETS,
                                  **common),
            "apollo": MemoryPlanner(config, method="full", optimizer="apollo-mini", **common)}


def _ist_seconds(planner: MemoryPlanner, budget: int, device: Device) -> float:
    generator = torch.Generator().manual_seed(0)
    policy = CheckpointPolicy(planner, budget)
    weights = torch.ones(planner.num_layers)
    total = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(DRAWS):
            active = sample_layers(weights, IST_ACTIVE, generator)
            blocks = policy.decide(active).checkpointed
            total += planner.step_time(planner.estimate(active,
                                                        gradient_checkpointing=blocks),
                                       device).seconds
    return total / DRAWS


def predicted_seconds(row: dict[str, Any], plans: dict[str, MemoryPlanner],
                      device: Device) -> float:
    """The predicted seconds of the step a time row measured."""
    name = row["method"]
    plan = plans["apollo" if name.startswith("apollo") else "lora"]
    n = plan.num_layers
    if name == "ist-sparse+budget":
        return _ist_seconds(plan, row["budget_bytes"], device)
    if name in ("lora+gc", "apollo-mini+gc"):
        est = plan.estimate(gradient_checkpointing=True, cut_backward=name != "lora+gc")
    elif name == "lora":
        est = plan.estimate()
    elif name == "lora+every-k":
        est = plan.estimate(gradient_checkpointing=every_kth(n, row["k"]))
    elif name in BUDGETED:
        count = round(statistics.median(row["checkpointed_blocks"]))
        est = plan.estimate(gradient_checkpointing=list(range(count)))
    else:
        raise ValueError(f"Invalid method: {name!r}; no prediction for it")
    return plan.step_time(est, device).seconds


def predicted_ratios(times: dict[tuple[int, str], dict[str, Any]], device: Device
                     ) -> dict[tuple[int, str], float]:
    """(budget, method) -> predicted ratio of its step time to ``lora+gc``'s there."""
    if not times:
        return {}
    first = next(iter(times.values()))
    plans = planners(first["model"], first["batch_size"], first["seq_len"], rank=8)
    seconds = {key: predicted_seconds(row, plans, device) for key, row in times.items()}
    return {(b, m): s / seconds[b, BASELINE] for (b, m), s in seconds.items()
            if (b, BASELINE) in seconds}
