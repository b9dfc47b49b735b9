"""The LLaMA-Factory route's pure parts (no llamafactory needed): the config split, the
refusals, and the one DeepSpeed line every route gives. The end-to-end tests with the real
LLaMA-Factory are in tests/llamafactory/ (``bash scripts/test-llamafactory.sh``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ist_optim.integrations.axolotl import check_axolotl_config
from ist_optim.integrations.callback import check_no_deepspeed
from ist_optim.integrations.common import DEEPSPEED_REFUSAL
from ist_optim.integrations.llamafactory import (
    REFUSED_KEYS,
    check_llamafactory_config,
    for_ddp,
    main,
    split_config,
)


def test_split_takes_the_ist_keys_out_and_validates_them():
    theirs, options, callback = split_config({
        "stage": "sft", "finetuning_type": "lora", "seed": 7, "ist_active_layers": 2,
        "ist_sampling": "uniform", "ist_log_layers": False,
        "per_device_train_batch_size": 4, "cutoff_len": 128})
    assert theirs == {"stage": "sft", "finetuning_type": "lora", "seed": 7,
                      "per_device_train_batch_size": 4, "cutoff_len": 128}
    assert options == {"active_layers": 2, "sampling": "uniform", "seed": 7}
    assert callback == {"ist_log_layers": False}


def test_the_memory_budget_predicts_llamafactorys_batch_shape():
    _, options, _ = split_config({"ist_memory_budget": "1GiB",
                                  "per_device_train_batch_size": 4, "cutoff_len": 128})
    assert options["memory_shape"] == (4, 128)
    _, options, _ = split_config({"ist_memory_budget": "1GiB"})  # LLaMA-Factory's defaults
    assert options["memory_shape"] == (8, 2048) and options["seed"] == 42


@pytest.mark.parametrize(("cfg", "message"), [
    ({"ist_active_layer": 2}, "unknown IST keys ['ist_active_layer']"),
    ({"ist_update_interval": 0}, "ist_update_interval: Invalid update_interval: 0"),
    ({"ist_importance_batches": "test"}, "Invalid ist_importance_batches: 'test'"),
])
def test_bad_ist_keys_are_one_line_errors(cfg, message):
    with pytest.raises(ValueError) as err:
        split_config(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("key", sorted(REFUSED_KEYS))
def test_optimizer_choices_of_llamafactory_are_refused_naming_them(key):
    with pytest.raises(ValueError, match=f"^{key}=") as err:
        check_llamafactory_config({"stage": "sft", key: 2 if key == "loraplus_lr_ratio" else True})
    assert "remove " + key in str(err.value)


@pytest.mark.parametrize(("cfg", "message"), [
    ({"stage": "ppo"}, "stage='ppo'"),
    ({"finetuning_type": "freeze"}, "finetuning_type='freeze'"),
    ({"torch_compile": True}, "set torch_compile: false"),
])
def test_other_refusals(cfg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_llamafactory_config(cfg)


def test_every_route_refuses_deepspeed_with_the_same_line():
    lines = []
    for check in (lambda: check_llamafactory_config({"deepspeed": "z2.json"}),
                  lambda: check_axolotl_config({"deepspeed": "z2.json"}),
                  lambda: check_no_deepspeed(SimpleNamespace(deepspeed="z2.json"))):
        with pytest.raises(ValueError) as err:
            check()
        lines.append(str(err.value))
    assert lines == [f"deepspeed='z2.json': {DEEPSPEED_REFUSAL}"] * 3
    assert "FSDP2" in DEEPSPEED_REFUSAL and "\n" not in DEEPSPEED_REFUSAL


def test_the_command_refuses_before_importing_llamafactory(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("stage: sft\nuse_badam: true\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ist-llamafactory: use_badam=True")
    assert main(["train"]) == 2 and "usage: ist-llamafactory" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llama3_lora_sft_ist.yaml", "llama3_full_sft_ist.yaml"])
def test_the_example_yamls_pass_the_checks(name):
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "examples" / "llamafactory" / name).read_text())
    check_llamafactory_config(cfg)
    theirs, options, _ = split_config(cfg)
    assert not any(k.startswith("ist_") for k in theirs) and options["active_layers"] >= 2


# ------------------------------------------------------------------ DDP (torchrun)
DDP = {"ddp_find_unused_parameters": True, "use_reentrant_gc": False}


@pytest.mark.parametrize("given", [{}, {"ddp_find_unused_parameters": True},
                                   {"use_reentrant_gc": False}])
def test_ddp_looks_for_unused_parameters_without_reentrant_checkpointing(given):
    assert for_ddp({"stage": "sft", **given}, {}, world_size=2) == {"stage": "sft", **DDP}


@pytest.mark.parametrize(("args", "options", "world"), [
    ({"stage": "sft"}, {}, 1),                                    # one process: no DDP
    ({"stage": "sft"}, {"freeze_inactive": False}, 4),            # every layer gets a grad
    ({"use_reentrant_gc": True, "ddp_find_unused_parameters": False}, {}, 1),
])
def test_ddp_keys_untouched_where_ddp_needs_nothing(args, options, world):
    assert for_ddp(args, options, world_size=world) == args


def test_ddp_without_checkpointing_leaves_the_checkpointing_key_alone():
    args = {"disable_gradient_checkpointing": True}
    assert for_ddp(args, {}, world_size=2) == {**args, "ddp_find_unused_parameters": True}


@pytest.mark.parametrize(("key", "value"), [("ddp_find_unused_parameters", False),
                                            ("use_reentrant_gc", True)])
def test_ddp_refuses_what_the_user_set_against_it(key, value):
    with pytest.raises(ValueError, match=f"^{key}={value} under DDP.*set it to") as err:
        for_ddp({key: value}, {}, world_size=2)
    assert "\n" not in str(err.value)
