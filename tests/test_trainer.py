"""ISTOptimizer inside transformers.Trainer: training, resume, optimizer_cls route, callback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import lora_model

from ist_optim import ISTOptimizer
from ist_optim.importance.batches import BatchCycler
from ist_optim.integrations import ist_optimizer_cls

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from ist_optim.integrations import ISTCallback, add_ist_callback  # noqa: E402

IST_KWARGS = dict(seed=0, active_layers=1, update_interval=2, num_candidates=2)


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences (labels = inputs), built from a private generator."""

    def __init__(self, n: int = 32, seq: int = 8, vocab: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_args(out, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_grad_norm=1.0, logging_steps=1,
                  save_steps=3, report_to=[], use_cpu=True, seed=0, data_seed=0,
                  eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4,
                  lr_scheduler_type="linear", warmup_steps=2, disable_tqdm=True,
                  learning_rate=1e-2, weight_decay=0.0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(out, *, opt_route: str = "instance", args_overrides=None, callbacks=None,
                 **ist_overrides):
    model = lora_model(4)
    ist_kwargs = {**IST_KWARGS, **ist_overrides}
    common = dict(model=model, args=training_args(out, **(args_overrides or {})),
                  train_dataset=TokenDataset(), eval_dataset=TokenDataset(8, seed=1),
                  callbacks=callbacks)
    if opt_route == "instance":
        opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, weight_decay=0.0, **ist_kwargs)
        return Trainer(optimizers=(opt, None), **common)
    cls = ist_optimizer_cls(model, torch.optim.AdamW, **ist_kwargs)
    return Trainer(optimizer_cls_and_kwargs=(cls, {"lr": 1e-2}), **common)


def ist_of(trainer) -> ISTOptimizer:
    from ist_optim.integrations import unwrap_ist_optimizer

    return unwrap_ist_optimizer(trainer.optimizer)


def test_trainer_schedules_accumulates_clips_evaluates_and_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path)
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    opt = ist_of(trainer)
    assert opt.num_steps == 6  # one optimizer step per 2 accumulated micro-batches
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    lrs = [e["learning_rate"] for e in train_logs]
    # linear warm-up over 2 steps, then linear decay to 0 at step 6 (built by the Trainer)
    assert lrs == pytest.approx([0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert opt.param_groups[0]["lr"] == 0.0
    assert all(torch.isfinite(torch.tensor(e["grad_norm"])) for e in train_logs)
    assert sum("eval_loss" in e for e in trainer.state.log_history) == 2
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(start[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert opt.last_round is not None and torch.count_nonzero(opt.importance) > 0
    saved = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert saved["ist"]["sampler"]["num_steps"] == 3


def test_gradient_clipping_reaches_the_clipped_gradients(tmp_path):
    seen = []

    class GradNorm(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))

    trainer = make_trainer(tmp_path, args_overrides=dict(max_grad_norm=1e-3, max_steps=2,
                                                         eval_strategy="no"),
                           callbacks=[GradNorm()])
    trainer.train()
    assert seen and all(n == pytest.approx(1e-3, rel=1e-3) for n in seen)


@pytest.mark.parametrize(("source", "policy"),
                         [(None, "keep"), ("eval", "keep"), (None, "offload"), (None, "drop")])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, source, policy):
    full = make_trainer(tmp_path / "full", state_policy=policy)
    full_cb = add_ist_callback(full, importance_batches=source)
    full.train()
    resumed = make_trainer(tmp_path / "resumed", state_policy=policy)
    resumed_cb = add_ist_callback(resumed, importance_batches=source)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))

    a, b = ist_of(full), ist_of(resumed)
    assert b.num_steps == a.num_steps == 6
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(),
                            strict=True):
        assert torch.equal(p, q), name
    assert torch.equal(a.scores, b.scores)
    assert a.active_layers == b.active_layers
    assert a.fingerprint() == b.fingerprint()
    # steps 4..6: the same layers trained and the same importance after each step
    assert resumed_cb.history.steps == [4, 5, 6]
    assert resumed_cb.history.trained == full_cb.history.trained[3:]
    assert resumed_cb.history.importance == full_cb.history.importance[3:]
    assert a.last_round == b.last_round


def test_optimizer_cls_and_kwargs_route_equals_instance_route(tmp_path):
    by_cls = make_trainer(tmp_path / "cls", opt_route="cls")
    by_cls.train()
    by_instance = make_trainer(tmp_path / "instance")
    by_instance.train()
    opt = ist_of(by_cls)
    assert type(opt).__name__ == "ISTAdamW"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]  # the Trainer's groups
    for p, q in zip(by_cls.model.parameters(), by_instance.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(opt.scores, ist_of(by_instance).scores)


def test_ist_optimizer_cls_refuses_a_kwarg_given_twice_and_reserved_names():
    model = lora_model(4)
    cls = ist_optimizer_cls(model, torch.optim.AdamW, lr=1e-3)
    with pytest.raises(TypeError, match=r"\['lr'\] both"):
        cls(model.parameters(), lr=1e-2)
    with pytest.raises(TypeError, match="params"):
        ist_optimizer_cls(model, torch.optim.AdamW, params=[])
    with pytest.raises(TypeError, match="Optimizer subclass"):
        ist_optimizer_cls(model, torch.optim.AdamW(model.parameters()))


class Recorder(TrainerCallback):
    """Stands for a reporting callback (TensorBoard, W&B): keeps what on_log received."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_callback_logs_reach_reporters_and_log_history(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callbacks=[recorder],
                           args_overrides=dict(logging_steps=2, eval_strategy="no"))
    callback = add_ist_callback(trainer)
    trainer.train()
    opt = ist_of(trainer)
    train_logs = [e for e in recorder.logs if "loss" in e]
    assert len(train_logs) == 3
    for entry in train_logs:
        assert entry["ist/num_active"] == 1.0
        active = [entry[f"ist/active_layer_{i}"] for i in range(4)]
        assert sum(active) == pytest.approx(1.0)  # 1 layer per step, averaged over 2 steps
        assert entry["ist/state_bytes"] > 0
    last = train_logs[-1]
    assert [last[f"ist/importance_layer_{i}"] for i in range(4)] == opt.importance.tolist()
    assert last["ist/state_bytes"] == opt.memory_report()["state_bytes_on_device"]
    assert last["ist/state_bytes_offloaded"] == 0.0  # state_policy="keep" on the CPU
    counts = callback.history.train_counts()
    last_two = callback.history.trained[-2:]
    assert [last[f"ist/active_layer_{i}"] for i in range(4)] == [
        sum(i in t for t in last_two) / 2 for i in range(4)]
    assert counts.sum() == 6
    history = [e for e in trainer.state.log_history if "loss" in e]
    assert all("ist/importance_layer_3" in e for e in history)
    assert not any(k.startswith("ist/") for e in recorder.logs if "loss" not in e for k in e)


def test_callback_without_layer_keys(tmp_path):
    trainer = make_trainer(tmp_path, args_overrides=dict(max_steps=2, eval_strategy="no"))
    add_ist_callback(trainer, log_layers=False)
    trainer.train()
    keys = {k for e in trainer.state.log_history for k in e if k.startswith("ist/")}
    assert keys == {"ist/num_active", "ist/state_bytes", "ist/state_bytes_offloaded"}


def test_train_source_is_the_shuffled_train_set_and_leaves_global_rng_alone(tmp_path):
    trainer = make_trainer(tmp_path, args_overrides=dict(max_steps=4, eval_strategy="no"))
    rng = torch.random.get_rng_state()
    callback = add_ist_callback(trainer, importance_batches="train")
    cycler = BatchCycler(callback.importance_batches)
    batches = [cycler.next() for _ in range(len(callback.importance_batches))]
    assert torch.equal(torch.random.get_rng_state(), rng)  # a DataLoader would draw a seed
    ids = torch.cat([b["input_ids"] for b in batches])
    dataset = trainer.train_dataset.ids
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, dataset[order])
    trainer.train()
    opt = ist_of(trainer)
    assert opt.rounds.batches.seen == 2  # rounds at steps 2 and 4
    assert not opt.rounds.batches.captures


def test_callback_writes_the_importance_plot(tmp_path):
    pytest.importorskip("matplotlib")
    trainer = make_trainer(tmp_path, args_overrides=dict(eval_strategy="no"))
    add_ist_callback(trainer, plot_path=tmp_path / "plots" / "importance.png")
    trainer.train()
    data = (tmp_path / "plots" / "importance.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_callback_errors(tmp_path):
    with pytest.raises(ValueError, match="add_ist_callback"):
        ISTCallback(importance_batches="eval")
    trainer = make_trainer(tmp_path, args_overrides=dict(eval_strategy="no"))
    with pytest.raises(ValueError, match="'test'"):
        add_ist_callback(trainer, importance_batches="test")
    add_ist_callback(trainer)
    with pytest.raises(ValueError, match="already has an ISTCallback"):
        add_ist_callback(trainer)
    model = lora_model(4)
    plain = Trainer(model=model, args=training_args(tmp_path / "plain", eval_strategy="no"),
                    train_dataset=TokenDataset(), callbacks=[ISTCallback()])
    with pytest.raises(TypeError, match="ISTCallback needs the Trainer to train with an IST"):
        plain.train()
    no_eval = Trainer(model=model, args=training_args(tmp_path / "x", eval_strategy="no"),
                      train_dataset=TokenDataset())
    with pytest.raises(ValueError, match="no eval_dataset"):
        add_ist_callback(no_eval, importance_batches="eval")


def test_import_ist_optim_needs_no_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import ist_optim, ist_optim.integrations as i\n"
        "assert callable(i.ist_optimizer_cls)\n"
        "try:\n    i.ISTCallback\nexcept ImportError:\n    print('lazy')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "lazy"


def test_memory_budget_replaces_the_trainers_checkpointing_and_logs(tmp_path, caplog):
    import logging

    recorder = Recorder()
    trainer = make_trainer(tmp_path, callbacks=[recorder], memory_budget="1GiB",
                           memory_shape=(4, 8), sampling="uniform",
                           args_overrides=dict(max_steps=2, eval_strategy="no",
                                               gradient_checkpointing=True))
    add_ist_callback(trainer, log_layers=False)
    with caplog.at_level(logging.INFO, logger="ist_optim.integrations.callback"):
        trainer.train()
    assert any("replaced by the optimizer's memory_budget" in r.message for r in caplog.records)
    assert any("checkpointed blocks []" in r.message for r in caplog.records)
    layers = trainer.model.get_base_model().model.layers
    assert not any(layer.gradient_checkpointing for layer in layers)  # 1 GiB: none needed
    opt = ist_of(trainer)
    logs = [e for e in recorder.logs if "loss" in e]
    assert len(logs) == 2
    for entry in logs:
        assert entry["ist/checkpointed_blocks"] == 0.0
        assert 0 < entry["ist/predicted_peak_bytes"] < 2**30
    assert logs[-1]["ist/predicted_peak_bytes"] == opt.memory_report()["predicted_peak_bytes"]
