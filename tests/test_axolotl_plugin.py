"""The axolotl plugin's parts that need no axolotl (ist_optim/integrations/axolotl.py).

The plugin class itself runs under the real ``axolotl train`` in tests/integrations/
(``bash scripts/test-integrations.sh``, its own environment); here: the YAML-option
mapping, the refusals, the ``ist_*`` schema (pydantic), and the optimizer installation on a
real ``transformers.Trainer``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from ist_optim import ISTOptimizer
from ist_optim.integrations import axolotl as plugin
from ist_optim.integrations.axolotl import (
    check_axolotl_config,
    check_axolotl_ddp,
    default_lora_kernels_off,
    install_ist_optimizer,
    ist_options,
    resolve_optimizer_alias,
)

HAS_AXOLOTL = importlib.util.find_spec("axolotl") is not None


# ---------------------------------------------------------------------- options
def test_options_map_the_set_keys_only() -> None:
    cfg = {"ist_active_layers": 0.5, "ist_update_interval": 5, "ist_estimator": "normalized",
           "ist_sampling": "depth-aware", "ist_state_policy": "drop", "ist_seed": 3,
           "ist_num_candidates": None, "seed": 99, "learning_rate": 1e-4}
    assert ist_options(cfg) == {"active_layers": 0.5, "update_interval": 5,
                                "estimator": "normalized", "sampling": "depth-aware",
                                "state_policy": "drop", "seed": 3}


def test_seed_defaults_to_axolotls_seed() -> None:
    assert ist_options({"seed": 7}) == {"seed": 7}
    assert ist_options({}) == {}


def test_memory_budget_takes_its_shape_from_the_batch_settings() -> None:
    options = ist_options({"ist_memory_budget": "2GiB", "micro_batch_size": 4,
                           "sequence_len": 512})
    assert options == {"memory_budget": "2GiB", "memory_shape": (4, 512)}
    with pytest.raises(ValueError, match="set both in the YAML"):
        ist_options({"ist_memory_budget": "2GiB", "micro_batch_size": 4})


@pytest.mark.parametrize(("cfg", "error", "message"), [
    ({"ist_update_interval": 0}, ValueError, "^ist_update_interval: Invalid update_interval"),
    ({"ist_active_layers": 1.5}, ValueError, "^ist_active_layers: active_layers=1.5"),
    ({"ist_sampling": "sideways"}, ValueError, "^ist_sampling: Invalid sampling: 'sideways'"),
    ({"ist_estimator": "magic"}, ValueError, "^ist_estimator: Invalid estimator"),
    ({"ist_state_policy": "elsewhere"}, ValueError, "^ist_state_policy: Invalid state_policy"),
    ({"ist_memory_budget": "lots", "micro_batch_size": 1, "sequence_len": 8}, ValueError,
     "^ist_memory_budget: "),
    # one rule for sizes (issue 33): as memory_budget="24" and `plan --budget 24`
    ({"ist_memory_budget": "24", "micro_batch_size": 1, "sequence_len": 8}, ValueError,
     "^ist_memory_budget: Invalid memory_budget: '24' has no unit; write '24GiB'"),
    ({"ist_budget_redraws": 2}, ValueError, "^ist_budget_redraws: budget_redraws=2"),
    ({"ist_freeze_inactive": "yes"}, TypeError, "^ist_freeze_inactive: freeze_inactive"),
    ({"ist_dense_steps": -3}, ValueError, "^ist_dense_steps: Invalid dense_steps: -3"),
    ({"ist_skip_nonfinite": "no"}, TypeError, "^ist_skip_nonfinite: skip_nonfinite"),
])
def test_bad_options_name_the_yaml_key(cfg: dict[str, Any], error: type[Exception],
                                       message: str) -> None:
    with pytest.raises(error, match=message):
        ist_options(cfg)


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("cfg", "message"), [
    ({"lisa_n_layers": 2, "lisa_step_interval": 1}, "lisa_n_layers=2 is axolotl's LISA"),
    ({"gradient_checkpointing": True, "ist_memory_budget": "1GiB", "micro_batch_size": 1,
      "sequence_len": 8}, "set gradient_checkpointing: false"),
    ({"lora_qkv_kernel": True, "ist_memory_budget": "1GiB"}, "set lora_qkv_kernel: false"),
    ({"torch_compile": True}, "set torch_compile: false"),
    ({"deepspeed": "zero2.json"}, "IST does not run under DeepSpeed"),
    ({"fsdp_config": {"fsdp_version": 2}}, "fsdp_config is set"),
    ({"rl": "dpo"}, "rl='dpo'"),
    ({"relora": True}, "ReLoRA"),
    ({"adapter": "llama-adapter"}, "adapter='llama-adapter' is not supported"),
    ({"optimizer": "adalomo"}, "optimizer='adalomo' does not update"),
    ({"optimizer": "ist_galore_adamw_layerwise"}, "galore_adamw_layerwise"),
    ({"optimizer": "schedule_free_adamw"}, "schedule_free_adamw"),
    ({"ist_importance_batches": "test"}, "Invalid ist_importance_batches: 'test'"),
    ({"ist_importance_batches": "eval", "val_set_size": 0}, "needs an eval split"),
    ({"ist_importance_batches": "train", "ist_sampling": "uniform"}, "runs no importance"),
    ({"ist_update_interval": -1}, "ist_update_interval"),
])
def test_refused_settings(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_axolotl_config(cfg)


@pytest.mark.parametrize(("cfg", "change", "message"), [
    ({}, {"torch_compile": True}, "set torch_compile: false"),
    ({"adapter": "lora", "optimizer": "adamw_torch", "gradient_checkpointing": True},
     {"adapter": "ia3"}, "adapter='ia3' is not supported"),
    ({"adapter": "qlora", "optimizer": "ist_adamw_bnb_8bit", "ist_active_layers": 2},
     {"optimizer": "ist_galore_adamw_layerwise"}, "galore_adamw_layerwise"),
    ({"ist_importance_batches": "eval", "val_set_size": 0.1}, {"val_set_size": 0},
     "needs an eval split"),
    ({"ist_memory_budget": "24GiB", "micro_batch_size": 2, "sequence_len": 512,
      "lora_qkv_kernel": False, "gradient_checkpointing": False},
     {"gradient_checkpointing": True}, "set gradient_checkpointing: false"),
    ({"lisa_n_layers": None, "lisa_layers_attribute": "model.layers"},  # axolotl's defaults
     {"lisa_n_layers": 4}, "lisa_n_layers=4 is axolotl's LISA"),
])
def test_accepted_settings_are_one_change_from_a_refusal(cfg: dict[str, Any],
                                                         change: dict[str, Any],
                                                         message: str) -> None:
    """Each accepted configuration passes, and changing the one setting the check reads
    for it is refused: the acceptance is the check's verdict, not a check that reads
    nothing."""
    check_axolotl_config(cfg)
    with pytest.raises(ValueError, match=message):
        check_axolotl_config({**cfg, **change})


def test_optimizer_alias() -> None:
    assert resolve_optimizer_alias("ist_adamw_torch_fused") == ("adamw_torch_fused", True)
    assert resolve_optimizer_alias("adamw_torch") == ("adamw_torch", False)
    assert resolve_optimizer_alias(None) == (None, False)


def test_lora_kernels_default_off_only_when_unset_and_with_an_adapter() -> None:
    cfg: dict[str, Any] = {"adapter": "qlora", "lora_mlp_kernel": True}
    assert default_lora_kernels_off(cfg) == ["lora_qkv_kernel", "lora_o_kernel",
                                             "lora_embedding_kernel"]
    assert cfg["lora_mlp_kernel"] is True and cfg["lora_o_kernel"] is False
    full: dict[str, Any] = {"adapter": None}
    assert default_lora_kernels_off(full) == [] and full == {"adapter": None}


# ---------------------------------------------------------------------- ISTArgs (pydantic)
def test_ist_args_validate_with_the_rest_of_the_config() -> None:
    pydantic = pytest.importorskip("pydantic")

    class AxolotlLike(pydantic.BaseModel):  # what axolotl merges ISTArgs into
        optimizer: str | None = "adamw_torch_fused"
        adapter: str | None = None
        lisa_n_layers: int | None = None

    class Merged(AxolotlLike, plugin.ISTArgs):
        pass

    cfg = Merged(optimizer="ist_adamw_bnb_8bit", ist_active_layers=2, ist_sampling="uniform")
    assert cfg.optimizer == "adamw_bnb_8bit" and cfg.ist_active_layers == 2
    with pytest.raises(pydantic.ValidationError, match="ist_update_interval: Invalid"):
        Merged(ist_update_interval=0)
    with pytest.raises(pydantic.ValidationError, match="lisa_n_layers=4 is axolotl's LISA"):
        Merged(lisa_n_layers=4)
    with pytest.raises(pydantic.ValidationError, match="ist_active_layers"):
        Merged(ist_active_layers="many")
    # axolotl fills micro_batch_size / sequence_len defaults after this validator
    assert Merged(ist_memory_budget="1GiB").ist_memory_budget == "1GiB"
    assert plugin.ISTArgs.__module__ == "ist_optim.integrations.axolotl"


@pytest.mark.skipif(HAS_AXOLOTL, reason="axolotl is installed here")
def test_plugin_without_axolotl_is_a_loud_error() -> None:
    # a RuntimeError, not an ImportError: axolotl only logs a plugin's ImportError and
    # trains on without it
    with pytest.raises(RuntimeError, match="needs axolotl"):
        plugin.ISTPlugin  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        plugin.Nothing  # noqa: B018


# ---------------------------------------------------------------------- installation
def _tiny_lora_model() -> torch.nn.Module:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.model.rotary_emb.__init__(config)  # the buffers to_empty left uninitialised
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))


def _trainer(tmp_path: Any, optim: str = "adamw_torch", **kwargs: Any) -> Trainer:
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], optim=optim,
                             learning_rate=1e-3, weight_decay=0.1, max_steps=2,
                             per_device_train_batch_size=2, save_strategy="no",
                             disable_tqdm=True)
    return Trainer(model=_tiny_lora_model(), args=args, **kwargs)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])  # axolotl's default
def test_install_wraps_what_the_trainer_would_build(tmp_path: Any, optim: str) -> None:
    trainer = _trainer(tmp_path, optim=optim)
    reference = trainer.create_optimizer()
    reference_groups = [{k: v for k, v in g.items() if k != "params"}
                        for g in reference.param_groups]
    trainer.optimizer = None
    opt = install_ist_optimizer(trainer, {"active_layers": 1, "seed": 0})
    assert trainer.optimizer is opt and isinstance(opt, ISTOptimizer)
    assert type(opt.optimizer) is type(reference)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] \
        == reference_groups
    assert [len(g["params"]) for g in opt.param_groups] == \
        [len(g["params"]) for g in reference.param_groups]
    assert opt.defaults == reference.defaults  # the constructor kwargs (lr, fused, ...)
    assert opt.defaults["lr"] == 1e-3
    assert opt.num_layers == 4 and opt.num_active == 1


def test_install_keeps_the_constructor_kwargs_of_bitsandbytes(tmp_path: Any) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    trainer = _trainer(tmp_path, optim="adamw_bnb_8bit")
    opt = install_ist_optimizer(trainer, {"active_layers": 1, "seed": 0})
    assert isinstance(opt.optimizer, bnb.optim.AdamW)
    assert opt.optimizer.args.optim_bits == 8  # not the class default (32)


def test_installed_optimizer_trains_under_the_trainers_scheduler(tmp_path: Any) -> None:
    data = [{"input_ids": torch.arange(8) % 64, "labels": torch.arange(8) % 64}] * 4
    trainer = _trainer(tmp_path, train_dataset=data)
    opt = install_ist_optimizer(trainer, {"active_layers": 1, "seed": 0,
                                          "sampling": "uniform"})
    trainer.train()
    assert opt.num_steps == 2
    assert trainer.lr_scheduler.optimizer is opt or \
        trainer.lr_scheduler.optimizer.optimizer is opt  # accelerate may wrap it


def test_install_refuses_twice_and_after_training_started(tmp_path: Any) -> None:
    trainer = _trainer(tmp_path)
    install_ist_optimizer(trainer, {"seed": 0})
    with pytest.raises(RuntimeError, match="already trains with an ISTOptimizer"):
        install_ist_optimizer(trainer, {"seed": 0})
    stepped = _trainer(tmp_path)
    optimizer = stepped.create_optimizer()
    for p in stepped.model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    optimizer.step()
    with pytest.raises(RuntimeError, match="already holds state"):
        install_ist_optimizer(stepped, {"seed": 0})


def test_install_refuses_an_optimizer_it_cannot_rebuild(tmp_path: Any) -> None:
    trainer = _trainer(tmp_path)

    class Factory(torch.optim.SGD):  # built by a path that records no (class, kwargs)
        pass

    trainer.create_optimizer = lambda: Factory(trainer.model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="cannot rebuild Factory"):
        install_ist_optimizer(trainer, {"seed": 0})


def test_the_schedule_and_nonfinite_keys_reach_the_optimizer() -> None:
    options = ist_options({"ist_dense_steps": 5, "ist_ramp_steps": 3,
                           "ist_skip_nonfinite": True})
    assert options == {"dense_steps": 5, "ramp_steps": 3, "skip_nonfinite": True}


def test_describe_says_the_configured_count_and_the_coming_steps_when_they_differ():
    blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))
    model = torch.nn.Sequential(*blocks)
    steady = ISTOptimizer(torch.optim.SGD, model, lr=0.1, layers=list(blocks),
                          active_layers=1, sampling="uniform")
    assert plugin.describe(steady).startswith("IST: SGD over 4 layers, 1 trained per step (")
    steady.close()
    dense = ISTOptimizer(torch.optim.SGD, model, lr=0.1, layers=list(blocks), active_layers=1,
                         sampling="uniform", dense_steps=2)
    assert plugin.describe(dense).startswith(
        "IST: SGD over 4 layers, 1 trained per step, 4 in the coming step (uniform sampling")


# ---------------------------------------------------------------------- DDP
DDP_OK = {"ddp_find_unused_parameters": True}


@pytest.mark.parametrize("cfg", [
    DDP_OK,
    {**DDP_OK, "gradient_checkpointing": True,
     "gradient_checkpointing_kwargs": {"use_reentrant": False}},
    {**DDP_OK, "gradient_checkpointing": "offload"},  # axolotl's own checkpointing
    {"ist_freeze_inactive": False},                   # every layer gets a gradient
])
def test_ddp_settings_that_work_pass(cfg) -> None:
    check_axolotl_ddp(cfg, world_size=2)


@pytest.mark.parametrize(("cfg", "fix"), [
    ({}, "set ddp_find_unused_parameters: true"),
    ({"ddp_find_unused_parameters": False}, "set ddp_find_unused_parameters: true"),
    ({**DDP_OK, "gradient_checkpointing": True}, "use_reentrant: false"),
    ({**DDP_OK, "gradient_checkpointing": True,
      "gradient_checkpointing_kwargs": {"use_reentrant": True}}, "use_reentrant: false"),
])
def test_ddp_settings_that_fail_are_refused_in_one_line(cfg, fix) -> None:
    check_axolotl_ddp(cfg, world_size=1)  # one process: nothing to refuse
    with pytest.raises(ValueError, match="under DDP") as err:
        check_axolotl_ddp(cfg, world_size=2)
    assert fix in str(err.value) and "\n" not in str(err.value)


def test_the_config_check_reads_the_world_size_of_the_launch(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=None under DDP"):
        check_axolotl_config({"adapter": "lora"})
    check_axolotl_config({"adapter": "lora", **DDP_OK})
