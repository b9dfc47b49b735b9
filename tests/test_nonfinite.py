"""skip_nonfinite=True: a step whose applied gradients are not finite is skipped whole."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import lm_batch, lora_model, params_snapshot

from ist_optim import ISTOptimizer

sys.path.insert(0, str(Path(__file__).parent))
import dist_workers as workers  # noqa: E402


def _poison(opt: ISTOptimizer) -> None:
    """A NaN in one gradient of an active layer, after the backward."""
    param = opt.layer_groups.layer_params(opt.active_layers)[0]
    param.grad[(0,) * param.grad.dim()] = float("nan")


def _run(opt, model, batches, poison_at=()):
    for i, seed in enumerate(batches):
        model(**lm_batch(seed=seed)).loss.backward()
        if i in poison_at:
            _poison(opt)
        opt.step()
        opt.zero_grad()


def _sampler_state(opt):
    state = opt.sampler.state_dict()
    return {k: v for k, v in state.items() if k != "skipped_steps"}


@pytest.mark.parametrize("estimator", ["paper", "first-order"])
def test_a_skipped_step_changes_nothing_and_the_run_continues_as_without_it(estimator):
    kwargs = {"lr": 1e-2, "seed": 5, "estimator": estimator, "update_interval": 2,
              "skip_nonfinite": True}
    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, **kwargs)
    _run(opt, model, [0, 1])
    before = (params_snapshot(model), copy.deepcopy(opt.optimizer.state_dict()),
              copy.deepcopy(_sampler_state(opt)), opt.rounds.state_dict())
    with pytest.warns(RuntimeWarning, match="not finite; the step is skipped"):
        _run(opt, model, [99], poison_at=[0])
    assert opt.skipped_steps == 1 and opt.num_steps == 2
    after = (params_snapshot(model), opt.optimizer.state_dict(), _sampler_state(opt),
             opt.rounds.state_dict())
    for name, value in before[0].items():
        assert torch.equal(after[0][name], value), name
    assert str(after[1]) == str(before[1]) and str(after[2]) == str(before[2])
    assert str(after[3]) == str(before[3])  # the probe kept nothing of the skipped step
    _run(opt, model, [2, 3, 4])
    assert opt.state_dict()["ist"]["sampler"]["skipped_steps"] == 1

    reference_model = lora_model(6)
    reference = ISTOptimizer(torch.optim.AdamW, reference_model, **kwargs)
    _run(reference, reference_model, [0, 1, 2, 3, 4])
    assert torch.equal(reference.scores, opt.scores)
    for name, value in params_snapshot(reference_model).items():
        assert torch.equal(params_snapshot(model)[name], value), name


def test_warned_once_then_counted():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, skip_nonfinite=True)
    with pytest.warns(RuntimeWarning) as caught:
        _run(opt, model, [0, 1, 2], poison_at=[0, 1, 2])
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1
    assert opt.skipped_steps == 3 and opt.num_steps == 0


def test_off_by_default_the_step_is_the_inner_optimizers():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    active = opt.layer_groups.layer_params(opt.active_layers)[0]
    _run(opt, model, [0], poison_at=[0])
    assert torch.isnan(active).any() and opt.skipped_steps == 0 and opt.num_steps == 1


def test_an_inactive_layers_gradient_is_not_a_reason_to_skip():
    """With freeze_inactive=False every gradient is computed, but only the active ones are
    applied: a NaN outside them changes nothing."""
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, freeze_inactive=False,
                       active_layers=1, skip_nonfinite=True)
    model(**lm_batch()).loss.backward()
    inactive = next(i for i in range(4) if i not in opt.active_layers)
    opt.layer_groups.params[inactive][0].grad.fill_(float("nan"))
    opt.step()
    assert opt.skipped_steps == 0 and opt.num_steps == 1


def test_checkpoint_round_trip_keeps_the_count():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, skip_nonfinite=True)
    with pytest.warns(RuntimeWarning):
        _run(opt, model, [0, 1], poison_at=[1])
    other = ISTOptimizer(torch.optim.AdamW, lora_model(4), lr=1e-2, seed=1,
                         skip_nonfinite=True)
    other.load_state_dict(opt.state_dict())
    assert other.skipped_steps == 1 and other.num_steps == 1
    bad = opt.state_dict()
    bad["ist"]["sampler"]["skipped_steps"] = -2
    with pytest.raises(ValueError, match="skipped_steps"):
        other.load_state_dict(bad)


def test_refused_with_a_closure_and_with_a_non_bool():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, skip_nonfinite=True)
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: model(**lm_batch()).loss)
    with pytest.raises(TypeError, match="skip_nonfinite must be a bool"):
        ISTOptimizer(torch.optim.AdamW, lora_model(4), lr=1e-2, skip_nonfinite=1)


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")
def test_every_rank_skips_together():
    results = workers.launch(workers.nonfinite_worker, world_size=2)
    assert results[0]["steps"] == results[1]["steps"]
    assert results[0]["steps"][3][:2] == (3, 1)  # step 4 skipped on both ranks
    assert results[0]["fingerprint"] == results[1]["fingerprint"]
