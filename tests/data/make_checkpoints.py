"""Writes checkpoints of an older ist_optim, for tests/test_state_dict.py to resume.

``PYTHONPATH=OLD_CHECKOUT python tests/data/make_checkpoints.py FILE`` with an older
checkout first on the path (so its ``ist_optim`` is imported). The file holds, per
configuration, the trainable parameters and ``opt.state_dict()`` after 5 steps, and what
the old code then did in 4 more steps (the active sets, the final scores and trainable
parameters), so the tests can check that today's code resumes it exactly. Written so:

* ``ist_v1_checkpoints.pt``: commit 53233cf (the last before the ISTOptimizer split,
  IST state format 1);
* ``ist_v2_checkpoints.pt``: commit f2c7c21 (format 2, the last before the second design
  pass: sampling rules, schedule, registries).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import lora_model, train_steps  # noqa: E402

from ist_optim import ISTOptimizer  # noqa: E402

CONFIGS = {
    "paper-adamw": dict(lr=1e-2, seed=11, update_interval=2, active_layers=2),
    "normalized-depth": dict(lr=1e-2, seed=5, update_interval=2, active_layers=3,
                             estimator="normalized", sampling="depth-aware"),
    "first-order-drop": dict(lr=1e-2, seed=7, update_interval=3, active_layers=2,
                             estimator="first-order", state_policy="drop"),
    "uniform-offload": dict(lr=1e-2, seed=3, active_layers=2, sampling="uniform",
                            state_policy="offload"),
}


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def main() -> None:
    out = {}
    for name, kwargs in CONFIGS.items():
        model = lora_model(8)
        opt = ISTOptimizer(torch.optim.AdamW, model, **kwargs)
        train_steps(model, opt, 5)
        entry = {"kwargs": kwargs, "params": trainable(model),
                 "optimizer": copy.deepcopy(opt.state_dict())}  # state tensors are live
        entry["next_sets"] = train_steps(model, opt, 4, start=5)
        entry["final_params"] = trainable(model)
        entry["final_scores"] = opt.scores
        out[name] = entry
    torch.save(out, Path(__file__).with_name(sys.argv[1]))


if __name__ == "__main__":
    main()
