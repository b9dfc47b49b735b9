"""IST-wrapped optimizers solve random least-squares problems split into layers."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ist_optim import ISTOptimizer


class Chunk(nn.Module):
    """One "layer": adds A_i @ w_i to the running prediction (a residual block)."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(torch.zeros(a.shape[1], dtype=a.dtype))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.a @ self.w


class LeastSquares(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, num_layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(Chunk(c) for c in a.chunk(num_layers, dim=1))
        self.register_buffer("b", b)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h)
        return (h - self.b).pow(2).sum()

    def solution(self) -> torch.Tensor:
        return torch.cat([blk.w.detach() for blk in self.blocks])


def _problem(seed: int, num_layers: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4 * num_layers, 2 * num_layers, generator=g, dtype=torch.float64)
    b = torch.randn(4 * num_layers, generator=g, dtype=torch.float64)
    x_star = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    return LeastSquares(a, b, num_layers), x_star


def _solve(model, opt, steps, scheduler=None):
    h0 = torch.zeros_like(model.b)
    for _ in range(steps):
        loss = model(h0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.data())
def test_ist_sgd_reaches_the_least_squares_optimum(seed, num_layers, data):
    k = data.draw(st.integers(1, num_layers))
    model, x_star = _problem(seed, num_layers)
    lipschitz = 2 * torch.linalg.matrix_norm(model.b.new_tensor(
        torch.cat([blk.a for blk in model.blocks], 1)), ord=2) ** 2
    opt = ISTOptimizer(torch.optim.SGD, model, lr=float(1 / lipschitz), seed=seed,
                       active_layers=k, update_interval=10)
    _solve(model, opt, 3000)
    # The objective, not the distance to x*: the importance scores may starve a layer
    # (seed 281, 3 layers, one active: layer 0 trained on 43 of 3000 steps), which leaves
    # it 5e-3 from x* while the loss is within 3e-5 of the optimum's (as in the AdamW case).
    h0 = torch.zeros_like(model.b)
    a = torch.cat([blk.a for blk in model.blocks], 1)
    optimum = (a @ x_star - model.b).pow(2).sum()
    with torch.no_grad():
        assert model(h0) - optimum <= 1e-3 * (1 + optimum)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 6), st.data())
def test_ist_adamw_reaches_the_least_squares_optimum(seed, num_layers, data):
    k = data.draw(st.integers(1, num_layers))
    model, x_star = _problem(seed, num_layers)
    steps = 3000
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=0.05, weight_decay=0.0, seed=seed,
                       active_layers=k, update_interval=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1 - t / steps) ** 2)
    _solve(model, opt, steps, sched)
    # The objective, not the distance to x*: the paper's estimator may starve a layer of a
    # 2-layer problem (seed 4880, one active: layer 0 trained on 25 of 3000 steps), which
    # leaves it 0.06 from x* while the loss is within 0.7% of the optimum's.
    h0 = torch.zeros_like(model.b)
    a = torch.cat([blk.a for blk in model.blocks], 1)
    optimum = (a @ x_star - model.b).pow(2).sum()
    with torch.no_grad():
        assert model(h0) - optimum <= 2e-2 * (1 + optimum)
