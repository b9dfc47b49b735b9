"""A new sampling rule in one file: draw layers in proportion to their gradient norm.

This is the worked example of docs/extending.md. ``GradNormRule`` keeps a running mean of
each layer's gradient norm (updated for the layers that trained, GRASS-style) and draws
the layers of a step with weights proportional to it; importance rounds do not drive it.
Registering it makes ``sampling="grad-norm"`` a valid ``ISTOptimizer`` option; its state
is saved in the optimizer's checkpoint, so a resumed run draws the same layers.

Run: python examples/grad_norm_sampling.py [--steps 30]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch

from ist_optim import ISTConfig, ISTOptimizer, SamplingRule, register_sampling_rule


@register_sampling_rule
class GradNormRule(SamplingRule):
    """Weights = running mean of each layer's gradient norm (1.0 before a layer trains)."""

    name = "grad-norm"
    runs_rounds = False  # no importance rounds: the weights are the gradient norms
    observes_gradients = True  # observe() receives the trained layers' gradient norms

    def __init__(self, num_layers: int, num_active: int, config: ISTConfig):
        super().__init__(num_layers, num_active, config)
        self.decay = 0.9
        self.norms = torch.ones(num_layers, dtype=torch.float64)

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        return self.norms.clamp_min(1e-12)

    def observe(self, grad_norms: Mapping[int, float]) -> None:
        for layer, norm in grad_norms.items():
            self.norms[layer] = self.decay * self.norms[layer] + (1 - self.decay) * norm

    def state_dict(self) -> dict[str, Any]:
        return {"norms": self.norms.clone()}

    def check_state(self, state: Mapping[str, Any]) -> None:
        norms = state.get("norms")
        if not (isinstance(norms, torch.Tensor) and norms.shape == (self.num_layers,)):
            raise ValueError(f"grad-norm rule state needs 'norms' of shape ({self.num_layers},)")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.norms = state["norms"].to(torch.float64).clone()


def main(argv: list[str] | None = None) -> ISTOptimizer:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(8))
    with torch.no_grad():  # later blocks start larger: their gradients are larger
        for i, block in enumerate(blocks):
            block.weight.mul_(0.2 + 0.2 * i)
    model = torch.nn.Sequential(*blocks)
    opt = ISTOptimizer(torch.optim.AdamW, model, layers=list(blocks), lr=1e-2, seed=0,
                       active_layers=2, sampling="grad-norm")
    x, target = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    for step in range(1, args.steps + 1):
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0:
            probs = " ".join(f"{p:.2f}" for p in opt.sampling_probabilities.tolist())
            print(f"step {step:3d}  loss {loss.item():.4f}  draw probabilities [{probs}]")
    return opt


if __name__ == "__main__":
    main()
