"""The examples run end to end with tiny settings (their main() is called directly)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart(capsys):
    load("quickstart").main(["--steps", "5"])
    assert "step   5" in capsys.readouterr().out


def test_hf_trainer_example_trains_logs_plots_and_resumes(tmp_path):
    pytest.importorskip("matplotlib")
    example = load("hf_trainer")
    out = tmp_path / "run"
    first = example.main(["--steps", "6", "--layers", "4", "--output-dir", str(out)])
    assert first["optimizer"].num_steps == 6
    assert first["plot"].read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoint-3" / "optimizer.pt").exists()
    logs = [e for e in first["trainer"].state.log_history if "loss" in e]
    assert logs and all("ist/importance_layer_0" in e for e in logs)
    resumed = example.main(["--steps", "6", "--layers", "4", "--output-dir",
                            str(tmp_path / "resumed"), "--resume", str(out / "checkpoint-3")])
    assert torch.equal(resumed["optimizer"].scores, first["optimizer"].scores)
    assert resumed["history"].trained == first["history"].trained[3:]
    by_cls = example.main(["--steps", "2", "--layers", "4", "--output-dir",
                           str(tmp_path / "cls"), "--route", "cls"])
    assert type(by_cls["optimizer"]).__name__ == "ISTAdamW"


def test_accelerate_example(tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        result = load("accelerate_loop").main(
            ["--steps", "4", "--layers", "4", "--cpu", "--save-state", str(tmp_path / "s")])
    finally:
        AcceleratorState._reset_state(True)
    assert result["optimizer"].num_steps == 4
    assert result["history"].train_counts().sum() == 4 * result["optimizer"].num_active
    assert any((tmp_path / "s").iterdir())


def test_peft_methods_example():
    results = load("peft_methods").main(["--steps", "5", "--layers", "4"])
    assert set(results) == {"lora", "rslora", "dora", "ia3", "loha", "lokr", "full"}
    for result in results.values():
        assert torch.isfinite(torch.tensor(result["loss"]))
        assert result["optimizer"].last_round is not None
