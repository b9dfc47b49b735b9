"""Importance estimators: normalized advantages, first-order probe, their optimizer wiring."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import lm_batch, lora_model, tiny_llama
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_state_dict import _run as run_steps
from torch import nn

from ist_optim import ISTOptimizer, Suppressor
from ist_optim.importance.estimators import (
    ADVANTAGE_SCALE,
    SCORE_RETENTION,
    FirstOrderProbe,
    RunningScale,
    normalized_advantages,
    normalized_score_update,
    predicted_suppression_deltas,
)

finite = st.floats(-50.0, 50.0, allow_nan=False)
loss_lists = st.lists(finite, min_size=2, max_size=8)


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


# ---------------------------------------------------------------- pure functions
@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=20))
def test_running_scale_is_at_least_the_round_spread(spreads):
    scale = RunningScale()
    for i, sigma in enumerate(spreads):
        c = scale.update(sigma)
        assert c >= sigma
        if i == 0:
            assert scale.value == sigma
    copy = RunningScale()
    copy.load_state_dict(scale.state_dict())
    assert copy == scale


def test_running_scale_rejects_bad_spread():
    with pytest.raises(ValueError, match="finite"):
        RunningScale().update(math.nan)


@given(loss_lists)
def test_normalized_advantages_are_centered_and_bounded(losses):
    t = torch.tensor(losses, dtype=torch.float64)
    adv = normalized_advantages(t, RunningScale())
    k = len(losses)
    assert abs(float(adv.sum())) < 1e-9
    assert float(adv.pow(2).sum()) <= k * ADVANTAGE_SCALE**2 + 1e-9
    if float(t.max() - t.min()) > 1e-6:
        assert float(adv[int(t.argmin())]) >= float(adv.max()) - 1e-12


@given(loss_lists, st.floats(0.01, 100.0), st.floats(-100.0, 100.0))
def test_normalized_advantages_do_not_depend_on_loss_level_or_scale(losses, a, b):
    t = torch.tensor(losses, dtype=torch.float64)
    assume(float(t.std()) >= 1e-3)  # equal losses: see the test below
    first = normalized_advantages(t, RunningScale())
    moved = normalized_advantages(a * t + b, RunningScale())
    assert torch.allclose(first, moved, atol=1e-6)


def test_normalized_advantages_zero_for_equal_losses():
    for value in (2.5, 0.1):  # 0.1: the mean differs from each loss by rounding only
        assert normalized_advantages(torch.full((3,), value), RunningScale()).abs().max() == 0


def test_quiet_round_moves_less_than_a_loud_one():
    scale = RunningScale()
    loud = normalized_advantages(torch.tensor([1.0, 2.0, 3.0]), scale)
    quiet = normalized_advantages(torch.tensor([1.0, 1.01, 1.02]), scale)
    assert quiet.abs().max() < 0.1 * loud.abs().max()


def test_normalized_score_update_matches_documented_formula():
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    sets = [[0, 1], [1, 2], [3, 0]]
    losses = torch.tensor([3.0, 3.4, 2.9], dtype=torch.float64)
    scale = RunningScale(value=0.5, rounds=4)
    got = normalized_score_update(scores, sets, losses, scale, 10.0)
    # by hand, from the module docstring
    mean = losses.mean()
    sigma = math.sqrt(float(((losses - mean) ** 2).mean()))
    m = 0.9 * 0.5 + 0.1 * sigma
    c = max(sigma, m)
    adv = 0.1 * (mean - losses) / c
    kept = 0.9 * scores
    p = torch.sigmoid(kept)
    expected = kept.clone()
    for k, members in enumerate(sets):
        for i in members:
            expected[i] += 10.0 * adv[k] * p[i] * (1 - p[i])
    assert torch.allclose(got, expected, atol=1e-12)
    assert scale.rounds == 5 and math.isclose(scale.value, m)


@given(st.lists(st.floats(-5, 5), min_size=2, max_size=6), st.integers(1, 50))
@settings(max_examples=30)
def test_normalized_scores_stay_bounded(start, rounds):
    bound = 10.0 * ADVANTAGE_SCALE * 3 / (4 * (1 - SCORE_RETENTION))
    g = torch.Generator().manual_seed(rounds)
    scores = torch.tensor(start, dtype=torch.float64).clamp(-bound, bound)
    n = scores.numel()
    scale = RunningScale()
    for _ in range(rounds):
        sets = [sorted(torch.randperm(n, generator=g)[: max(1, n // 2)].tolist()) for _ in range(3)]
        losses = torch.rand(3, generator=g, dtype=torch.float64) * 1e-3
        scores = normalized_score_update(scores, sets, losses, scale, 10.0)
        assert scores.abs().max() <= bound + 1e-9


@given(st.integers(2, 30), st.integers(1, 60), st.integers(0, 1000))
@settings(max_examples=30)
def test_first_order_style_scores_stay_bounded(num_layers, rounds, seed):
    """Singleton sets (one per reached layer): bound eta tau sqrt(n-1) / (4 (1 - rho))."""
    bound = 10.0 * ADVANTAGE_SCALE * math.sqrt(num_layers - 1) / (4 * (1 - SCORE_RETENTION))
    g = torch.Generator().manual_seed(seed)
    scores = torch.zeros(num_layers, dtype=torch.float64)
    scale = RunningScale()
    sets = [[i] for i in range(num_layers)]
    for _ in range(rounds):
        deltas = torch.randn(num_layers, generator=g, dtype=torch.float64).pow(3)
        scores = normalized_score_update(scores, sets, deltas, scale, 10.0)
        assert scores.abs().max() <= bound + 1e-9


@given(st.lists(st.tuples(st.floats(-10, 10), st.integers(0, 5)), min_size=1, max_size=8),
       st.floats(0.0, 0.99))
def test_predicted_deltas_are_means_times_lambda_minus_one(pairs, lam):
    sums = torch.tensor([s for s, _ in pairs], dtype=torch.float64)
    counts = torch.tensor([c for _, c in pairs], dtype=torch.int64)
    reached, deltas = predicted_suppression_deltas(sums, counts, lam)
    assert reached == [i for i, (_, c) in enumerate(pairs) if c > 0]
    for j, i in enumerate(reached):
        assert math.isclose(float(deltas[j]), (lam - 1) * pairs[i][0] / pairs[i][1],
                            rel_tol=1e-9, abs_tol=1e-12)


# ---------------------------------------------------------------- first-order probe
def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model.base_model.model.model.layers)


def test_probe_equals_lora_parameter_identity():
    """For LoRA, <dL/dy, y> = <grad_B, B> = <grad_A, A>, layer by layer."""
    model = lora_model(4)
    probe = FirstOrderProbe(_layers(model), "adapters")
    model(**lm_batch()).loss.backward()
    probe.end_step()
    sums, counts = probe.take()
    assert counts.tolist() == [1, 1, 1, 1]
    for i, block in enumerate(_layers(model)):
        by_b = sum(float((p.grad * p).sum()) for n, p in block.named_parameters() if "lora_B" in n)
        by_a = sum(float((p.grad * p).sum()) for n, p in block.named_parameters() if "lora_A" in n)
        assert math.isclose(float(sums[i]), by_b, rel_tol=1e-4, abs_tol=1e-7)
        assert math.isclose(float(sums[i]), by_a, rel_tol=1e-4, abs_tol=1e-7)
    probe.remove()


@pytest.mark.parametrize("mode", ["adapters", "residual"])
def test_probe_matches_finite_difference_suppression(mode):
    model = lora_model(4) if mode == "adapters" else tiny_llama(4)
    blocks = _layers(model) if mode == "adapters" else list(model.model.layers)
    batch = lm_batch(batch=2, seq=12)
    model.eval()
    probe = FirstOrderProbe(blocks, mode)
    base = model(**batch).loss
    base.backward()
    probe.end_step()
    sums, _ = probe.take()
    probe.remove()
    eps = 1e-3
    with torch.no_grad():
        for i in range(len(blocks)):
            with Suppressor(blocks, 1.0 - eps, mode).suppress([i]):
                damped = float(model(**batch).loss)
            finite_diff = damped - float(base)
            predicted = -eps * float(sums[i])
            assert math.isclose(finite_diff, predicted, rel_tol=0.05, abs_tol=2e-6), (i, mode)


def test_probe_reaches_frozen_layers_above_the_lowest_trained_one():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.0, active_layers=1, estimator="first-order",
                       update_interval=100, seed=0)
    opt.set_active_layers([2])
    model(**lm_batch()).loss.backward()
    opt.step()
    sums, counts = opt.rounds.probe.take()
    assert counts.tolist() == [0, 0, 1, 1]
    assert sums[0] == 0 and sums[1] == 0 and sums[3] != 0
    opt.close()


def test_probe_ignores_no_grad_forwards():
    model = lora_model(2)
    probe = FirstOrderProbe(_layers(model), "adapters")
    with torch.no_grad():
        model(**lm_batch())
    probe.end_step()
    sums, counts = probe.take()
    assert counts.sum() == 0 and sums.abs().sum() == 0
    probe.remove()


def test_probe_rejects_dora_and_leaves_no_hook():
    model = lora_model(2, use_dora=True)
    with pytest.raises(ValueError, match="plain peft LoRA"):
        ISTOptimizer(torch.optim.SGD, model, lr=0.1, estimator="first-order")
    hooks = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert hooks == []


def test_probe_remove_detaches_hooks():
    model = lora_model(2)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, estimator="first-order", seed=0)
    probe = opt.rounds.probe
    opt.close()
    model(**lm_batch()).loss.backward()
    probe.end_step()
    assert probe.take()[1].sum() == 0


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


def test_first_order_runs_no_extra_forward():
    model = lora_model(4)
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.01, estimator="first-order",
                       update_interval=2, seed=0)
    for _ in range(4):
        model(**lm_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(calls) == 4
    assert opt.last_round is not None and opt.scores.abs().sum() > 0


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


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_probe_counts_once_under_gradient_checkpointing(use_reentrant):
    def probe_sums(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model = lora_model(4)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        probe = FirstOrderProbe(_layers(model), "adapters")
        model(**lm_batch()).loss.backward()
        probe.end_step()
        return probe.take()

    plain_sums, plain_counts = probe_sums(False)
    sums, counts = probe_sums(True)
    assert counts.tolist() == plain_counts.tolist() == [1, 1, 1, 1]
    assert torch.allclose(sums, plain_sums, rtol=1e-5, atol=1e-8)
