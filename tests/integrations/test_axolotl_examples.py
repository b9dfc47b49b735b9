"""axolotl's own example configs (tests/integrations/upstream/, byte for byte) with the IST
plugin lines, through the real ``axolotl train``: each trains with gradient checkpointing on
(as the examples have it: reentrant for LoRA and QLoRA, axolotl's default), logs ``ist/*``,
and resumes from a checkpoint to the same weights. Only the edits a CPU without network
forces are made; :data:`CPU_EDITS` lists each with its reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fixtures import assert_ok, train_logs, weights, write_dataset, write_tiny_llama
from test_axolotl_e2e import PLUGIN, run_axolotl

UPSTREAM = Path(__file__).parent / "upstream"
PAD = "<|end_of_text|>"  # the examples' pad token: in the tiny tokenizer, so nothing resizes
STEPS = 4

#: (key, value, why): the edits a CPU without network forces, the same for every example.
CPU_EDITS: list[tuple[str, Any, str]] = [
    ("base_model", "<tiny local model>", "no network: a random-init Llama saved locally"),
    ("datasets", "<local alpaca jsonl>", "no network: 64 alpaca records written locally"),
    ("dataset_prepared_path", "<workdir>", "inside the test's temporary folder"),
    ("output_dir", "<workdir>/out", "inside the test's temporary folder"),
    ("attn_implementation", "sdpa", "flash_attention_2 needs a GPU"),
    ("bf16", False, "this CPU has no fast bf16; the tiny model is fp32"),
    ("sample_packing", False, "multipack needs flash attention's varlen kernels"),
    ("eval_sample_packing", False, "as sample_packing"),
    ("sequence_len", 256, "the tiny model's positions (records are ~60 tokens)"),
    ("max_steps", STEPS, "CPU time: a few steps show training, logs and resume"),
    ("saves_per_epoch", None, "replaced by save_steps: a checkpoint to resume from"),
    ("save_steps", 2, "a checkpoint mid-run to resume from"),
    ("evals_per_epoch", None, "CPU time: no evaluation (val_set_size kept)"),
    # not a CPU's doing: the examples set no seed, and axolotl then seeds each run anew,
    # so no resumed run (with or without the plugin) sees the batches of the run it resumes
    ("seed", 42, "to resume exactly: the examples set none"),
]
#: the plugin lines a user adds (docs/axolotl.md)
PLUGIN_LINES: dict[str, Any] = {"plugins": [PLUGIN], "ist_active_layers": 2,
                                "ist_update_interval": 2, "ist_seed": 0}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    return {"model": write_tiny_llama(root / "model", layers=4, extra_specials=(PAD,)),
            "data": write_dataset(root / "data.jsonl", rows=96)}


def example_config(name: str, inputs: dict[str, Path], workdir: Path, **more: Any
                   ) -> dict[str, Any]:
    cfg = yaml.safe_load((UPSTREAM / name).read_text(encoding="utf-8"))
    values = {"base_model": str(inputs["model"]),
              "datasets": [{"path": str(inputs["data"]), "ds_type": "json", "type": "alpaca"}],
              "dataset_prepared_path": str(workdir / "prepared"),
              "output_dir": str(workdir / "out")}
    for key, value, _why in CPU_EDITS:
        value = values.get(key, value)
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg.update(PLUGIN_LINES)
    cfg.update(more)
    return cfg


def _checkpoints(workdir: Path) -> list[Path]:
    out = workdir / "out"
    return sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


@pytest.mark.parametrize("name", ["lora-1b.yml", "qlora-1b.yml", "fft-8b.yaml"])
def test_upstream_example_trains_logs_and_resumes(name: str, inputs: dict[str, Path],
                                                  tmp_path: Path) -> None:
    upstream = yaml.safe_load((UPSTREAM / name).read_text(encoding="utf-8"))
    assert upstream["gradient_checkpointing"] is True  # what the examples turn on

    full = tmp_path / "full"
    assert_ok(run_axolotl(example_config(name, inputs, full), full))
    checkpoints = _checkpoints(full)
    assert [c.name for c in checkpoints] == [f"checkpoint-{s}" for s in range(2, STEPS + 1, 2)]
    logs = train_logs(checkpoints[-1])
    assert sorted(logs) == list(range(1, STEPS + 1))
    for entry in logs.values():
        assert entry["ist/num_active"] == 2 and "ist/importance_layer_0" in entry
    console = (full / "console.log").read_text(encoding="utf-8")
    assert "backward cut cannot act" not in console

    resumed = tmp_path / "resumed"
    cfg = example_config(name, inputs, resumed, resume_from_checkpoint=str(checkpoints[0]))
    assert_ok(run_axolotl(cfg, resumed))
    final, again = weights(checkpoints[-1]), weights(_checkpoints(resumed)[-1])
    assert final.keys() == again.keys()
    for key, tensor in final.items():
        assert torch.equal(tensor, again[key]), key
