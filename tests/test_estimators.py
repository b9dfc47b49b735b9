"""The built-in estimators in the optimizer: options, what each learns on a model with
known importance, checkpoints; and the names ``ist_optim.importance.estimators`` keeps.
Each estimator's math has its own file (test_paper.py, test_normalized.py,
test_first_order.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import lm_batch, lora_model
from test_state_dict import _run as run_steps
from torch import nn

import ist_optim.importance.estimators as estimators_module
from ist_optim import FirstOrderRound, ISTOptimizer, NormalizedRound, PaperRound, Suppressor
from ist_optim.registry import estimator


# ---------------------------------------------------------------- a model with known importance
class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class _Net(nn.Module):
    def __init__(self, num_layers: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(_Block(dim) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = block(x)
        return x


def graded_model(factors: list[float], dim: int = 16, seed: int = 0) -> nn.Module:
    """Identity blocks plus LoRA adapters whose size is ``factors[i]``: layer i matters ~ f_i."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["fc"], init_lora_weights=False)
        model = get_peft_model(_Net(len(factors), dim), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                layer = int(name.split("layers.")[1].split(".")[0])
                p.mul_(factors[layer] / math.sqrt(dim))
    return model


def graded_batches(model: nn.Module, count: int, dim: int = 16, seed: int = 1) -> list[dict]:
    """Targets are the model's output with every adapter doubled, so adapters matter."""
    g = torch.Generator().manual_seed(seed)
    blocks = list(model.base_model.model.layers)
    batches = []
    for _ in range(count):
        x = torch.randn(32, dim, generator=g)
        with torch.no_grad(), Suppressor(blocks, 2.0).suppress(range(len(blocks))):
            y = model(x)
        batches.append({"x": x, "y": y})
    return batches


def mse_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """MSE plus 4: the loss level of a language model, where the paper's rewards flatten."""
    return (model(batch["x"]) - batch["y"]).pow(2).mean() + 4.0


# ---------------------------------------------------------------- optimizer wiring
def test_bad_estimator_options_raise_clear_errors():
    model = lora_model(2)
    with pytest.raises(ValueError, match="Invalid estimator: 'fast'"):
        ISTOptimizer(torch.optim.SGD, model, lr=0.1, estimator="fast")
    with pytest.raises(ValueError, match="sampling='uniform'"):
        ISTOptimizer(torch.optim.SGD, model, lr=0.1, estimator="normalized", sampling="uniform")
    with pytest.raises(ValueError, match="drop importance_batches"):
        ISTOptimizer(torch.optim.SGD, model, lr=0.1, estimator="first-order",
                     importance_batches=[lm_batch()])
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, estimator="first-order")
    with pytest.raises(ValueError, match="no importance batches"):
        opt.set_importance_batches([lm_batch()])


def _graded_run(estimator: str, rounds: int, factors: list[float]) -> ISTOptimizer:
    model = graded_model(factors)
    data = graded_batches(model, rounds + 10)
    extra = {} if estimator == "first-order" else {"importance_batches": data[rounds:]}
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.0, estimator=estimator, update_interval=1,
                       loss_fn=mse_loss, seed=0, **extra)
    for step in range(rounds):
        mse_loss(model, data[step]).backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("estimator", ["normalized", "first-order"])
def test_informative_estimators_spread_sampling_when_layers_differ(estimator):
    factors = [3.0, 3.0, 1.0, 1.0, 1.0, 1.0, 0.3, 0.3]
    opt = _graded_run(estimator, 8, factors)
    assert opt.sampling_spread()["max_min_ratio"] > 2.0
    importance = opt.importance
    assert set(importance.argsort(descending=True)[:2].tolist()) == {0, 1}
    assert float(importance[6:].max()) < float(importance[:2].min())
    paper = _graded_run("paper", 8, factors)
    assert paper.sampling_spread()["max_min_ratio"] < 1.2


@pytest.mark.parametrize("estimator", ["paper", "normalized", "first-order"])
@pytest.mark.parametrize("sampling", ["importance", "depth-aware"])
def test_checkpoint_round_trip_continues_identically(estimator, sampling, tmp_path):
    def build():
        model = lora_model(6)
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, estimator=estimator,
                           sampling=sampling, update_interval=2, seed=3)
        return model, opt

    model, opt = build()
    run_steps(model, opt, 5, 0)  # mid-interval: probe sums are pending
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, tmp_path / "c.pt")
    reference = run_steps(model, opt, 5, 5)
    ref_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_scores = opt.scores

    model2, opt2 = build()
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    resumed = run_steps(model2, opt2, 5, 5)
    assert resumed == reference
    assert torch.equal(opt2.scores, ref_scores)
    for n, p in model2.named_parameters():
        assert torch.equal(p, ref_params[n]), n
    if estimator != "paper":
        assert ref_scores.abs().sum() > 0


def test_loading_another_estimators_checkpoint_raises():
    saved = ISTOptimizer(torch.optim.SGD, lora_model(2), lr=0.1,
                         estimator="normalized").state_dict()
    other = ISTOptimizer(torch.optim.SGD, lora_model(2), lr=0.1, estimator="paper")
    with pytest.raises(ValueError, match="estimator='normalized'"):
        other.load_state_dict(saved)


def test_sampling_spread_of_the_optimizer():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, seed=0)
    assert opt.sampling_spread() == {"max_min_ratio": 1.0, "kl_from_uniform": 0.0,
                                     "entropy_ratio": pytest.approx(1.0)}
    opt.sampler.set_scores(torch.tensor([2.0, 0.0, 0.0, -2.0], dtype=torch.float64))
    spread = opt.sampling_spread()
    expected = torch.sigmoid(torch.tensor(2.0)) / torch.sigmoid(torch.tensor(-2.0))
    assert spread["max_min_ratio"] == pytest.approx(float(expected), rel=1e-5)
    assert spread["kl_from_uniform"] > 0


def test_the_old_module_keeps_its_names_and_each_estimator_has_its_own():
    """``ist_optim.importance.estimators`` re-exports; the classes live one per module."""
    for name in estimators_module.__all__:
        assert getattr(estimators_module, name) is not None
    assert estimators_module.FirstOrderProbe.__module__ == "ist_optim.importance.first_order"
    assert estimators_module.RunningScale.__module__ == "ist_optim.importance.normalized"
    assert [estimator(n) for n in ("paper", "normalized", "first-order")] == [
        PaperRound, NormalizedRound, FirstOrderRound]
    assert [c.__module__.rsplit(".", 1)[1] for c in (PaperRound, NormalizedRound,
                                                     FirstOrderRound)] == [
        "paper", "normalized", "first_order"]
