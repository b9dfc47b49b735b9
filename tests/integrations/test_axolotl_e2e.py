"""End-to-end: the real ``axolotl train cfg.yml --launcher python`` with the IST plugin, on CPU.

Runs in the axolotl environment only (``bash scripts/test-integrations.sh``); the main suite
ignores this folder (see conftest.py). Each test writes a YAML, runs the CLI in a
subprocess and reads what axolotl wrote: checkpoints (adapter weights, ``optimizer.pt``,
``trainer_state.json`` with the ``ist/*`` log keys) and its console output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fixtures import active_layers as _active_layers
from fixtures import (
    assert_ok,
    changed_layers,
    train_logs,
    weights,
    write_dataset,
    write_tiny_llama,
)

PLUGIN = "ist_optim.integrations.axolotl.ISTPlugin"
NUM_LAYERS = 4


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return {"model": write_tiny_llama(root / "model", layers=NUM_LAYERS),
            "data": write_dataset(root / "data.jsonl")}


def active_layers(log: dict[str, Any]) -> set[int]:
    return _active_layers(log, NUM_LAYERS)


def base_config(inputs: dict[str, Path], workdir: Path, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base_model": str(inputs["model"]),
        "model_type": "LlamaForCausalLM",
        "tokenizer_type": "PreTrainedTokenizerFast",
        "plugins": [PLUGIN],
        "datasets": [{"path": str(inputs["data"]), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(workdir / "prepared"),
        "val_set_size": 0,
        "output_dir": str(workdir / "out"),
        "sequence_len": 64,
        "sample_packing": False,
        "adapter": "lora",
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "v_proj"],
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 6,
        "learning_rate": 0.01,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "warmup_steps": 0,
        "seed": 42,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1,
        "save_total_limit": 100,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": False,
        "ist_active_layers": 1,
        "ist_update_interval": 2,
        "ist_state_policy": "offload",
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def run_axolotl(cfg: dict[str, Any], workdir: Path) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}
    axolotl = Path(sys.executable).parent / "axolotl"
    result = subprocess.run([str(axolotl), "train", str(path), "--launcher", "python"],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    (workdir / "console.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    return result












@pytest.fixture(scope="module")
def lora_run(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("lora")
    result = run_axolotl(base_config(inputs, workdir), workdir)
    assert_ok(result)
    return workdir


def test_lora_trains_only_the_sampled_layers_each_step(lora_run: Path) -> None:
    out = lora_run / "out"
    logs = train_logs(out / "checkpoint-6")
    assert sorted(logs) == [1, 2, 3, 4, 5, 6]
    for step in range(2, 7):
        active = active_layers(logs[step])
        assert len(active) == 1, logs[step]
        changed = changed_layers(weights(out / f"checkpoint-{step - 1}"),
                                 weights(out / f"checkpoint-{step}"))
        assert changed == active, (step, changed, active)


def test_ist_keys_reach_the_logs(lora_run: Path) -> None:
    logs = train_logs(lora_run / "out" / "checkpoint-6")
    for entry in logs.values():
        assert entry["ist/num_active"] == 1.0
        assert {f"ist/importance_layer_{i}" for i in range(NUM_LAYERS)} <= set(entry)
        assert "ist/state_bytes" in entry and "ist/state_bytes_offloaded" in entry
    # offload: the device holds the state of the active layer only, the rest is offloaded
    assert logs[6]["ist/state_bytes_offloaded"] > logs[6]["ist/state_bytes"] > 0
    console = (lora_run / "console.log").read_text(encoding="utf-8")
    assert "IST: AdamW over 4 layers, 1 trained per step" in console
    assert "'ist/num_active'" in console


def test_adapter_is_saved(lora_run: Path) -> None:
    out = lora_run / "out"
    final, last = weights(out), weights(out / "checkpoint-6")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    checkpoint = torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)
    sampler = checkpoint["ist"]["sampler"]  # the IST state that resume continues from
    assert sampler["num_steps"] == 6 and sampler["seed"] == 42  # ist_seed defaults to seed


def test_resume_from_checkpoint_continues_exactly(lora_run: Path, inputs: dict[str, Path],
                                                  tmp_path: Path) -> None:
    first = lora_run / "out"
    cfg = base_config(inputs, tmp_path, resume_from_checkpoint=str(first / "checkpoint-3"))
    assert_ok(run_axolotl(cfg, tmp_path))
    resumed, uninterrupted = weights(tmp_path / "out"), weights(first)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    logs, reference = train_logs(tmp_path / "out" / "checkpoint-6"), train_logs(
        first / "checkpoint-6")
    for step in (4, 5, 6):
        assert active_layers(logs[step]) == active_layers(reference[step])
        assert logs[step]["loss"] == reference[step]["loss"]


def test_full_finetuning_trains_sampled_blocks_and_the_outside(inputs: dict[str, Path],
                                                                tmp_path: Path) -> None:
    cfg = base_config(inputs, tmp_path, adapter=None, lora_r=None, lora_alpha=None,
                      lora_dropout=None, lora_target_modules=None, max_steps=3,
                      learning_rate=1e-3, ist_active_layers=2)
    assert_ok(run_axolotl(cfg, tmp_path))
    out = tmp_path / "out"
    logs = train_logs(out / "checkpoint-3")
    for step in (2, 3):
        changed = changed_layers(weights(out / f"checkpoint-{step - 1}"),
                                 weights(out / f"checkpoint-{step}"))
        assert changed == active_layers(logs[step]) | {-1}, (step, changed)


def test_qlora_trains_only_the_sampled_adapters(inputs: dict[str, Path],
                                                tmp_path: Path) -> None:
    cfg = base_config(inputs, tmp_path, adapter="qlora", load_in_4bit=True, max_steps=3)
    result = run_axolotl(cfg, tmp_path)
    assert_ok(result)
    assert "prepare_model_for_kbit_training" in result.stdout + result.stderr  # 4-bit base
    out = tmp_path / "out"
    logs = train_logs(out / "checkpoint-3")
    for step in (2, 3):
        changed = changed_layers(weights(out / f"checkpoint-{step - 1}"),
                                 weights(out / f"checkpoint-{step}"))
        assert changed == active_layers(logs[step]), (step, changed)


def test_bitsandbytes_8bit_optimizer_is_the_inner_one(inputs: dict[str, Path],
                                                      tmp_path: Path) -> None:
    cfg = base_config(inputs, tmp_path, optimizer="ist_adamw_bnb_8bit", max_steps=2,
                      lora_target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"],
                      lora_r=64)
    result = run_axolotl(cfg, tmp_path)
    assert_ok(result)
    assert "IST: AdamW over 4 layers" in result.stdout + result.stderr
    state = torch.load(tmp_path / "out" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    quantized = [per_param["__bnb_optimizer_quant_state__"] for per_param in
                 state["state"].values() if "__bnb_optimizer_quant_state__" in per_param]
    # tensors of 4096+ elements get 8-bit moments (bitsandbytes' min_8bit_size)
    assert any(q["state1"].dtype == torch.uint8 for q in quantized)
    assert "ist" in state


def test_memory_budget_logs_the_prediction(inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg = base_config(inputs, tmp_path, max_steps=2, ist_memory_budget="1GiB",
                      ist_sampling="depth-aware", ist_estimator="first-order")
    assert_ok(run_axolotl(cfg, tmp_path))
    logs = train_logs(tmp_path / "out" / "checkpoint-2")
    assert all(entry["ist/predicted_peak_bytes"] > 0 for entry in logs.values())
    assert all(entry["ist/checkpointed_blocks"] == 0 for entry in logs.values())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"lisa_n_layers": 2, "lisa_step_interval": 1}, "lisa_n_layers=2 is axolotl's LISA"),
    ({"gradient_checkpointing": True, "ist_memory_budget": "1GiB"},
     "set gradient_checkpointing: false"),
    ({"lora_qkv_kernel": True, "ist_memory_budget": "1GiB"}, "set lora_qkv_kernel: false"),
    ({"ist_update_interval": 0}, "ist_update_interval: Invalid update_interval: 0"),
    ({"ist_sampling": "sideways"}, "ist_sampling: Invalid sampling: 'sideways'"),
    # without the plugin line, the aliased optimizer name stops the run
    ({"plugins": None, "optimizer": "ist_adamw_torch"}, "ist_adamw_torch"),
], ids=["lisa", "budget-with-gc", "budget-with-kernel", "bad-interval", "bad-sampling",
        "plugin-missing"])
def test_refused_settings_stop_the_run(inputs: dict[str, Path], tmp_path: Path,
                                       overrides: dict[str, Any], message: str) -> None:
    result = run_axolotl(base_config(inputs, tmp_path, **overrides), tmp_path)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "out" / "checkpoint-1").exists()
