"""End-to-end: ``ist-llamafactory train cfg.yaml`` with the real LLaMA-Factory, on CPU.

Runs in the LLaMA-Factory environment only (``bash scripts/test-llamafactory.sh``). Each
test writes a LLaMA-Factory YAML with ``ist_*`` keys, runs the command in a subprocess and
reads what LLaMA-Factory wrote: checkpoints (adapter or model weights, ``optimizer.pt``,
``trainer_state.json`` with the ``ist/*`` log keys) and its console output.
"""

from __future__ import annotations

import json
import os
import re
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

NUM_LAYERS = 4
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    data = root / "data"
    data.mkdir()
    write_dataset(data / "tiny.jsonl", rows=64)
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.jsonl"}}))
    return {"model": write_tiny_llama(root / "model", layers=NUM_LAYERS), "data": data}


def active_layers(log: dict[str, Any]) -> set[int]:
    return _active_layers(log, NUM_LAYERS)


def base_config(inputs: dict[str, Path], workdir: Path, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_name_or_path": str(inputs["model"]),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target": "q_proj,v_proj",
        "dataset": "tiny",
        "dataset_dir": str(inputs["data"]),
        "template": "default",
        "cutoff_len": 64,
        "overwrite_cache": True,
        "output_dir": str(workdir / "out"),
        "logging_steps": 1,
        "save_steps": 1,
        "max_steps": 6,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 0.01,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.0,
        "bf16": False,
        "report_to": "none",
        "seed": 42,
        "ist_active_layers": 1,
        "ist_update_interval": 2,
        "ist_state_policy": "offload",
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


def run(cfg: dict[str, Any], workdir: Path, command: str = "ist-llamafactory",
        ranks: int = 1) -> subprocess.CompletedProcess[str]:
    """The command on ``cfg``; with ``ranks`` > 1 under ``torchrun`` (DDP)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "DISABLE_VERSION_CHECK": "1"}
    launcher = ([] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(ranks)])
    result = subprocess.run([*launcher, str(BIN / command), "train", str(path)], cwd=workdir,
                            env=env, capture_output=True, text=True, timeout=900)
    (workdir / "console.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    return result












def checkpoints(workdir: Path) -> list[Path]:
    return sorted((workdir / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


@pytest.fixture(scope="module")
def lora_run(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("lora")
    assert_ok(run(base_config(inputs, workdir), workdir))
    return workdir


def test_lora_trains_only_the_logged_active_layers(lora_run: Path) -> None:
    saved = checkpoints(lora_run)
    assert [c.name for c in saved] == [f"checkpoint-{s}" for s in range(1, 7)]
    logs = train_logs(saved[-1])
    for before, after in zip(saved, saved[1:], strict=False):
        step = int(after.name.split("-")[1])
        assert changed_layers(weights(before), weights(after)) == active_layers(logs[step])
    assert all(len(active_layers(logs[s])) == 1 for s in logs)


def test_ddp_ranks_train_the_same_logged_layers(inputs: dict[str, Path],
                                                tmp_path: Path) -> None:
    """Two gloo ranks under torchrun, LLaMA-Factory's LoRA defaults (which turn DDP's
    unused-parameter search off and checkpoint reentrantly, and fail with IST: the
    command sets both for DDP); both ranks draw and log the same layers."""
    assert_ok(run(base_config(inputs, tmp_path, ddp_backend="gloo", use_cpu=True), tmp_path,
                  ranks=2))
    saved = checkpoints(tmp_path)
    logs = train_logs(saved[-1])
    for before, after in zip(saved, saved[1:], strict=False):
        step = int(after.name.split("-")[1])
        assert changed_layers(weights(before), weights(after)) == active_layers(logs[step])
    console = (tmp_path / "console.log").read_text(encoding="utf-8")
    lines = re.findall(r"IST step (\d+): (trained .*)", console)
    per_step: dict[str, list[str]] = {}
    for step, line in lines:
        per_step.setdefault(step, []).append(line)
    assert sorted(per_step, key=int) == [str(s) for s in range(1, 7)]
    assert all(len(seen) == 2 and len(set(seen)) == 1 for seen in per_step.values())


def test_ist_keys_reach_the_logs(lora_run: Path) -> None:
    logs = train_logs(checkpoints(lora_run)[-1])
    assert sorted(logs) == list(range(1, 7))
    for entry in logs.values():
        assert entry["ist/num_active"] == 1 and "ist/importance_layer_0" in entry
        assert "ist/state_bytes_offloaded" in entry
    saved = torch.load(checkpoints(lora_run)[-1] / "optimizer.pt", weights_only=True)
    assert saved["ist"]["sampler"]["num_steps"] == 6


def test_resume_is_bit_identical(lora_run: Path, inputs: dict[str, Path],
                                 tmp_path: Path) -> None:
    first = checkpoints(lora_run)
    cfg = base_config(inputs, tmp_path, resume_from_checkpoint=str(first[2]))
    assert_ok(run(cfg, tmp_path))
    resumed = checkpoints(tmp_path)[-1]
    uninterrupted, again = weights(first[-1]), weights(resumed)
    assert uninterrupted.keys() == again.keys()
    assert all(torch.equal(uninterrupted[k], again[k]) for k in uninterrupted)
    logs, reference = train_logs(resumed), train_logs(first[-1])
    for step in (4, 5, 6):
        assert active_layers(logs[step]) == active_layers(reference[step])
        assert logs[step]["loss"] == reference[step]["loss"]


def test_full_finetuning_trains_sampled_blocks_and_the_outside(inputs: dict[str, Path],
                                                               tmp_path: Path) -> None:
    cfg = base_config(inputs, tmp_path, finetuning_type="full", max_steps=3, learning_rate=1e-3,
                      lora_rank=None, lora_alpha=None, lora_dropout=None, lora_target=None)
    assert_ok(run(cfg, tmp_path))
    saved = checkpoints(tmp_path)
    logs = train_logs(saved[-1])
    for before, after in zip(saved, saved[1:], strict=False):
        step = int(after.name.split("-")[1])
        assert changed_layers(weights(before), weights(after)) == \
            active_layers(logs[step]) | {-1}  # embeddings, norm and head train every step


def test_qlora_trains_only_the_sampled_adapters_and_resumes(inputs: dict[str, Path],
                                                            tmp_path: Path) -> None:
    cfg = base_config(inputs, tmp_path / "full", quantization_bit=4, max_steps=4)
    assert_ok(run(cfg, tmp_path / "full"))
    saved = checkpoints(tmp_path / "full")
    logs = train_logs(saved[-1])
    for before, after in zip(saved, saved[1:], strict=False):
        step = int(after.name.split("-")[1])
        assert changed_layers(weights(before), weights(after)) == active_layers(logs[step])
    cfg = base_config(inputs, tmp_path / "resumed", quantization_bit=4, max_steps=4,
                      resume_from_checkpoint=str(saved[1]))
    assert_ok(run(cfg, tmp_path / "resumed"))
    final, again = weights(saved[-1]), weights(checkpoints(tmp_path / "resumed")[-1])
    assert all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"use_badam": True}, "use_badam=True: BAdam trains one block at a time"),
    ({"deepspeed": "ds_z2.json"}, "IST does not run under DeepSpeed"),
    ({"stage": "ppo"}, "stage='ppo'"),
    ({"ist_active_layer": 2}, "unknown IST keys ['ist_active_layer']"),
    ({"ist_update_interval": 0}, "ist_update_interval: Invalid update_interval: 0"),
])
def test_what_ist_cannot_honour_is_refused_in_one_line(inputs: dict[str, Path], tmp_path: Path,
                                                       overrides: dict[str, Any],
                                                       message: str) -> None:
    result = run(base_config(inputs, tmp_path, **overrides), tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_v1_optimizer_plugin_builds_an_ist_optimizer() -> None:
    from llamafactory.v1.plugins.trainer_plugins.optimizer import OptimizerPlugin

    from ist_optim import ISTOptimizer
    from ist_optim.integrations.llamafactory import register_v1_optimizer

    assert register_v1_optimizer()
    blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
    model = torch.nn.Sequential(*blocks)
    opt = OptimizerPlugin("ist")(model, {"name": "ist", "lr": 1e-3, "active_layers": 1,
                                         "layers": list(blocks), "seed": 0})
    assert isinstance(opt, ISTOptimizer) and opt.num_layers == 4
    assert opt.param_groups[0]["lr"] == 1e-3
