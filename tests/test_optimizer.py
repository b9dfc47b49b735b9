"""ISTOptimizer step semantics, equivalence with the plain inner optimizer, and errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import lm_batch, lora_model, params_snapshot, tiny_llama

from ist_optim import ISTOptimizer


def _train_step(model, opt, seed):
    loss = model(**lm_batch(seed=seed)).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.detach()


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def test_exactly_the_sampled_layers_change():
    model = lora_model(8, modules_to_save=["lm_head"])
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=3, update_interval=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad or "lora_" in n}
    for step in range(7):
        active = set(opt.active_layers)
        assert len(active) == 2
        before = params_snapshot(model)
        _train_step(model, opt, step)
        after = params_snapshot(model)
        for name in before:
            changed = not torch.equal(before[name], after[name])
            layer = _layer_of(name)
            if name not in trainable:
                assert not changed, name
            elif layer is None:  # modules_to_save head: trains every step
                assert changed, name
            else:
                assert changed == (layer in active), (step, name, active)


def test_requires_grad_follows_the_active_set():
    model = lora_model(8)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0)
    for _ in range(3):
        active = set(opt.active_layers)
        for index, params in enumerate(opt.groups.params):
            assert all(p.requires_grad == (index in active) for p in params)
        _train_step(model, opt, 0)


def _plain_vs_ist(optimizer_cls, steps=6, **kwargs):
    model_a, model_b = lora_model(4), lora_model(4)
    plain = optimizer_cls([p for p in model_a.parameters() if p.requires_grad], **kwargs)
    ist = ISTOptimizer(optimizer_cls, model_b, active_layers=1.0, sampling="uniform", seed=0,
                       **kwargs)
    for step in range(steps):
        _train_step(model_a, plain, step)
        _train_step(model_b, ist, step)
        for (na, pa), (nb, pb) in zip(model_a.named_parameters(), model_b.named_parameters(),
                                      strict=True):
            assert na == nb and torch.equal(pa, pb), (step, na)


def test_all_layers_active_matches_plain_adamw():
    _plain_vs_ist(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)


def test_all_layers_active_matches_plain_sgd_momentum():
    _plain_vs_ist(torch.optim.SGD, lr=1e-2, momentum=0.9, nesterov=True)


def test_all_layers_active_matches_plain_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes")
    _plain_vs_ist(bnb.optim.AdamW8bit, lr=1e-2, min_8bit_size=16)


def test_freeze_inactive_false_gives_the_same_run():
    """Gated updates (static requires_grad, masked grads) = the requires_grad fast path."""
    runs = []
    for freeze in (True, False):
        model = lora_model(6)
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=5, update_interval=2,
                           freeze_inactive=freeze)
        sets = []
        for step in range(6):
            sets.append(opt.active_layers)
            _train_step(model, opt, step)
        runs.append((sets, params_snapshot(model), opt.importance))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][2], runs[1][2])
    assert all(torch.allclose(runs[0][1][n], runs[1][1][n], atol=1e-6) for n in runs[0][1])


def test_zero_grad_without_set_to_none_does_not_move_inactive_layers():
    model = lora_model(6)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=1, sampling="uniform")
    for step in range(4):
        active = set(opt.active_layers)
        before = params_snapshot(model)
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        after = params_snapshot(model)
        for name in before:
            layer = _layer_of(name)
            if "lora_" in name and layer not in active:
                assert torch.equal(before[name], after[name])


def test_gradient_accumulation_keeps_the_active_set_until_step():
    model_a, model_b = lora_model(6), lora_model(6)
    opt_a = ISTOptimizer(torch.optim.SGD, model_a, lr=0.1, seed=2, sampling="uniform")
    opt_b = ISTOptimizer(torch.optim.SGD, model_b, lr=0.1, seed=2, sampling="uniform")
    a, b = lm_batch(seed=0), lm_batch(seed=1)
    active = opt_a.active_layers
    (model_a(**a).loss / 2).backward()
    assert opt_a.active_layers == active
    (model_a(**b).loss / 2).backward()
    opt_a.step()
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    model_b(**both).loss.backward()
    opt_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_importance_rounds_every_interval_in_eval_mode_and_restore_train_mode():
    model = lora_model(4, lora_dropout=0.1)
    model.train()
    calls = []

    def loss_fn(m, batch):
        calls.append(m.training or any(x.training for x in m.modules()))
        return m(**batch).loss

    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0, update_interval=3,
                       num_candidates=3, suppressed_layers=2, loss_fn=loss_fn)
    for step in range(7):
        _train_step(model, opt, step)
        assert len(calls) == 3 * ((step + 1) // 3)
    assert calls and not any(calls)  # every estimation forward ran in eval mode
    assert all(m.training for m in model.modules())
    assert opt.last_round is not None and opt.last_round["step"] == 6
    assert len(opt.last_round["sets"]) == 3
    assert all(len(s) == 2 for s in opt.last_round["sets"])
    assert not torch.equal(opt.importance, torch.zeros(4))


def test_round_uses_the_latest_training_batch_and_scores_follow_the_formula():
    model = lora_model(4)
    seen = []

    def loss_fn(m, batch):
        seen.append(batch["input_ids"].clone())
        return m(**batch).loss

    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.0, seed=0, update_interval=1, loss_fn=loss_fn)
    batch = lm_batch(seed=42)
    model(**batch).loss.backward()
    opt.step()
    assert all(torch.equal(s, batch["input_ids"]) for s in seen)
    losses = torch.tensor(opt.last_round["losses"], dtype=torch.float64)
    rewards = torch.exp(-losses)
    adv = rewards - rewards.mean()
    expected = torch.zeros(4, dtype=torch.float64)
    for a, members in zip(adv, opt.last_round["sets"], strict=True):
        expected[members] += 10.0 * a * 0.25  # p (1 - p) = 1/4 at s = 0
    assert torch.allclose(opt.scores, expected)
    assert torch.allclose(opt.importance, -expected.float())


def test_importance_batches_are_cycled_and_moved():
    model = lora_model(4)
    batches = [lm_batch(seed=1), lm_batch(seed=2)]
    seen = []

    def loss_fn(m, batch):
        seen.append(batch["input_ids"][0, 0].item())
        return m(**batch).loss

    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.0, seed=0, update_interval=1,
                       importance_batches=batches, loss_fn=loss_fn, num_candidates=2)
    for _ in range(3):
        _train_step(model, opt, 0)
    firsts = [b["input_ids"][0, 0].item() for b in batches]
    assert seen == [firsts[0]] * 2 + [firsts[1]] * 2 + [firsts[0]] * 2


def test_non_finite_estimation_loss_skips_round_with_one_warning():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=1e-3, seed=0, update_interval=1,
                       loss_fn=lambda m, b: torch.tensor(float("nan")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            _train_step(model, opt, step)
    assert sum("non-finite" in str(w.message) for w in caught) == 1
    assert torch.equal(opt.scores, torch.zeros(4, dtype=torch.float64))
    assert opt.state_dict()["ist"]["rounds"]["skipped_rounds"] == 3


def test_closure_is_called_and_its_loss_returned():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, seed=0, sampling="uniform")
    batch = lm_batch()

    def closure():
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and math.isfinite(loss.item())
    assert opt.num_steps == 1


def test_torch_and_transformers_schedulers_accept_it():
    from transformers import get_scheduler

    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0)
    sched = get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=10)
    lrs = []
    for step in range(5):
        _train_step(model, opt, step)
        sched.step()
        lrs.append(opt.optimizer.param_groups[0]["lr"])
    assert lrs[:2] == [5e-3, 1e-2] and lrs[2] < 1e-2
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _train_step(model, opt, 9)
    step_lr.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[-1] * 0.5)


def test_param_groups_and_adafactor():
    model = lora_model(4)
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    opt = ISTOptimizer(torch.optim.Adafactor, model, lr=1e-2, seed=0,
                       params=[{"params": lora_a}, {"params": lora_b, "lr": 1e-3}])
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    _train_step(model, opt, 0)
    assert len(opt.state) > 0


def test_params_frozen_before_construction_are_registered_when_passed():
    model = lora_model(4)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(False)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, params=lora)
    assert sum(len(ps) for ps in opt.groups.params) == len(lora)
    active = opt.active_layers
    assert all(p.requires_grad for i in active for p in opt.groups.params[i])


def test_add_param_group_joins_each_param_to_its_layer_or_the_outside_group():
    """A group added after construction (here the blocks' norms and the head, unfrozen, at
    their own rate) trains as the constructor's params do: a block's params only while
    their layer is active (frozen otherwise), the others every step."""
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=3, active_layers=1)
    norms = [p for n, p in model.named_parameters() if "input_layernorm" in n]
    head = model.get_output_embeddings().weight
    for p in [*norms, head]:
        p.requires_grad_(True)
    opt.add_param_group({"params": [*norms, head], "lr": 1e-3})
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    assert [any(p is q for q in opt.groups.params[i]) for i, p in enumerate(norms)] == [True] * 4
    for step in range(4):
        active = set(opt.active_layers)
        assert [p.requires_grad for p in norms] == [i in active for i in range(4)]
        before = [p.detach().clone() for p in [*norms, head]]
        _train_step(model, opt, step)
        moved = [not torch.equal(p, old) for p, old in zip([*norms, head], before, strict=True)]
        assert moved == [*(i in active for i in range(4)), True], (step, active)


def test_does_not_touch_global_rng():
    model = lora_model(4)
    state = torch.random.get_rng_state()
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, update_interval=1)
    model.eval()  # no dropout draws from the training forward
    loss = model(**lm_batch()).loss
    loss.backward()
    opt.step()
    assert torch.equal(state, torch.random.get_rng_state())


def test_seeds_reproduce_and_differ():
    def sets(seed):
        model = lora_model(8)
        opt = ISTOptimizer(torch.optim.SGD, model, lr=0.0, seed=seed, sampling="uniform")
        out = []
        for _ in range(5):
            out.append(opt.active_layers)
            opt.step()
        return out

    assert sets(1) == sets(1)
    assert sets(1) != sets(2)


def test_full_finetuning_without_adapters():
    model = tiny_llama(4)
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0, update_interval=2)
    assert opt.rounds.suppressor.mode == "residual"
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in opt.groups.outside} >= {"model.embed_tokens.weight"}
    for step in range(4):
        _train_step(model, opt, step)
    assert not torch.equal(opt.importance, torch.zeros(4))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(active_layers=0), ValueError, "active_layers=0"),
        (dict(active_layers=5), ValueError, r"outside \[1, 4\]"),
        (dict(active_layers=1.5), ValueError, "fraction in"),
        (dict(active_layers=0.0), ValueError, "fraction in"),
        (dict(suppressed_layers=-0.5), ValueError, "suppressed_layers"),
        (dict(num_candidates=1), ValueError, "num_candidates"),
        (dict(score_lr=-1.0), ValueError, "score_lr"),
        (dict(suppression=1.0), ValueError, "suppression"),
        (dict(update_interval=0), ValueError, "update_interval"),
        (dict(update_interval=2.5), TypeError, "update_interval"),
        (dict(sampling="random"), ValueError, "sampling"),
        (dict(seed="1"), TypeError, "seed"),
        (dict(loss_fn=3), TypeError, "loss_fn"),
        (dict(importance_batches=iter([{}])), TypeError, "one-shot iterator"),
        (dict(sampling="uniform", importance_batches=[{}]), ValueError, "runs no importance"),
        (dict(freeze_inactive="yes"), TypeError, "freeze_inactive"),
        (dict(freeze_inactive=False, skip_backward=True), ValueError, "needs freeze_inactive"),
        (dict(skip_backward=1), TypeError, "skip_backward"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        ISTOptimizer(torch.optim.AdamW, lora_model(4), lr=1e-3, **kwargs)


def test_bad_optimizer_class_model_and_params():
    model = lora_model(4)
    with pytest.raises(TypeError, match="not an instance|got an instance"):
        ISTOptimizer(torch.optim.AdamW(model.parameters()), model)
    with pytest.raises(TypeError, match="Optimizer subclass"):
        ISTOptimizer(dict, model)
    with pytest.raises(TypeError, match="nn.Module"):
        ISTOptimizer(torch.optim.AdamW, "model")
    frozen = tiny_llama(2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        ISTOptimizer(torch.optim.AdamW, frozen)
    with pytest.raises(ValueError, match="params is empty"):
        ISTOptimizer(torch.optim.AdamW, model, params=[])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ISTOptimizer(torch.optim.AdamW, model, lr=-1.0)
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layers="):
        ISTOptimizer(torch.optim.AdamW, plain)


def test_failed_construction_leaves_no_hook_on_the_model():
    model = lora_model(4)
    bnb = pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="paged"):
        ISTOptimizer(bnb.optim.PagedAdamW8bit, model, lr=1e-3, state_policy="drop")
    assert not model._forward_pre_hooks
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_round_without_any_forward_explains_the_fix():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, seed=0, update_interval=1)
    with pytest.raises(RuntimeError, match="importance_batches="):
        opt.step()


def test_loss_fn_without_labels_explains_the_fix():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, seed=0, update_interval=1)
    out = model(input_ids=lm_batch()["input_ids"])
    out.logits.mean().backward()
    with pytest.raises(RuntimeError, match="no loss"):
        opt.step()


def test_close_removes_hook_and_unfreezes():
    model = lora_model(4)
    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.1, seed=0)
    opt.close()
    assert all(p.requires_grad for ps in opt.groups.params for p in ps)
    model(**lm_batch())
    assert not opt.rounds.batches.captures
    assert "ISTOptimizer(SGD, layers=4, active_layers=1, trained_next=1" in repr(opt)


def test_captured_batch_drops_num_items_in_batch():
    """A round replays the micro-batch's own mean loss, not a share of the Trainer's sum."""
    model = lora_model(4)
    seen = []

    def loss_fn(m, batch):
        seen.append(sorted(batch))
        return m(**batch).loss

    opt = ISTOptimizer(torch.optim.SGD, model, lr=0.0, seed=0, update_interval=1,
                       loss_fn=loss_fn, num_candidates=2, suppression=0.999)
    batch = lm_batch()
    out = model(**batch, num_items_in_batch=torch.tensor(1000))
    out.loss.backward()
    opt.step()
    assert seen and all("num_items_in_batch" not in keys for keys in seen)
    with torch.no_grad():
        mean_loss = model(**batch).loss.item()
    assert opt.last_round["losses"][0] == pytest.approx(mean_loss, rel=1e-2)
