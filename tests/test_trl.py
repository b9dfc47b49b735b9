"""TRL's SFTTrainer with IST under gradient checkpointing, as TRL users set it up: a peft
LoRA model, ``SFTConfig(gradient_checkpointing=True)``, the optimizer passed in, the
callback logging ``ist/*``; trains, logs and resumes exactly, in each checkpointing mode."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import save_tiny_llama_dir

from ist_optim import ISTOptimizer
from ist_optim.integrations import add_ist_callback, unwrap_ist_optimizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TEXTS = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7} times." for i in
         range(48)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny"), TEXTS)


def _trainer(model_dir, out, checkpointing_kwargs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir)  # float32, as saved
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    config = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4,
                  learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1,
                  logging_steps=1, save_steps=2, report_to=[], use_cpu=True, seed=0,
                  data_seed=0, disable_tqdm=True, gradient_checkpointing=True,
                  max_length=32, bf16=False, fp16=False)
    if checkpointing_kwargs is not None:
        config["gradient_checkpointing_kwargs"] = checkpointing_kwargs
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-2, seed=0, active_layers=1,
                       update_interval=2, num_candidates=2)
    trainer = SFTTrainer(model=model, args=SFTConfig(**config),
                         train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
                         processing_class=tokenizer, optimizers=(opt, None))
    add_ist_callback(trainer)
    return trainer


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}, {"use_reentrant": False}],
                         ids=["default", "reentrant", "non-reentrant"])
def test_sft_with_gradient_checkpointing_trains_logs_and_resumes(model_dir, tmp_path, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _trainer(model_dir, tmp_path / "full", kwargs)
        start = {n: p.detach().clone() for n, p in full.model.named_parameters()}
        full.train()
        resumed = _trainer(model_dir, tmp_path / "resumed", kwargs)
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    opt = unwrap_ist_optimizer(full.optimizer)
    assert opt.num_steps == 4
    logs = [e for e in full.state.log_history if "loss" in e]
    assert len(logs) == 4 and all("ist/num_active" in e for e in logs)
    changed = {n for n, p in full.model.named_parameters() if not torch.equal(start[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert full.model.base_model.model.is_gradient_checkpointing
    # where TRL forces input grads (enable_input_require_grads), backward is cut
    forced = getattr(full.model.base_model.model, "_require_grads_hook", None) is not None
    assert opt.activator.backward_cut is not None
    assert (opt.activator.backward_cut.cuts > 0) == forced
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(),
                            strict=True):
        assert torch.equal(p, q), name
    assert unwrap_ist_optimizer(resumed.optimizer).active_layers == opt.active_layers
