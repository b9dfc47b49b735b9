"""``planner_for_model`` (ist_optim/planner/from_model.py): the planner of a model in hand,
its blocks taken from the optimizer's ``LayerGroups``."""

from __future__ import annotations

import pytest
import torch
from conftest import lora_model, tiny_llama
from torch import nn

from ist_optim import ISTOptimizer, build_layer_groups
from ist_optim.planner.from_model import (
    optimizer_kind,
    planner_for_model,
    trains_embeddings_and_head,
)


class Wrapped(nn.Module):
    """A Llama LM held under another name: no ``model.model.layers`` at the top."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.config = lm.config

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def forward(self, **batch):
        return self.lm(**batch)


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def test_the_blocks_come_from_the_layer_groups_not_a_fixed_path():
    lm = tiny_llama(4)
    direct = planner_for_model(lm, _adamw(lm), batch_size=2, seq_len=8)
    wrapped = Wrapped(lm)
    groups = build_layer_groups(wrapped, list(wrapped.parameters()), None)
    planner = planner_for_model(wrapped, _adamw(wrapped), batch_size=2, seq_len=8,
                                layers=groups)
    assert planner.num_layers == 4 and planner.costs == direct.costs
    assert planner.method == "full"


def test_the_optimizer_plans_its_own_blocks():
    """memory_shape= on a model the planner once found only at model.model.layers."""
    model = Wrapped(tiny_llama(4))
    opt = ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, seed=0, memory_budget="1GiB",
                       memory_shape=(2, 8))
    assert opt.budget_policy.policy.planner.num_layers == opt.num_layers == 4
    opt.close()


def test_lora_adapters_are_read_from_the_blocks():
    model = lora_model(4)
    planner = planner_for_model(model, _adamw(model), batch_size=2, seq_len=8)
    assert planner.method == "lora" and planner.settings["lora_rank"] == 4
    blocks = list(model.get_base_model().model.layers)
    assert planner_for_model(model, _adamw(model), batch_size=2, seq_len=8,
                             layers=blocks).costs == planner.costs


def test_blocks_other_than_the_configs_layers_are_refused_with_the_way_out():
    model = tiny_llama(4)
    blocks = list(model.model.layers)[:3]
    with pytest.raises(ValueError, match="config, which has 4 layers, but the optimizer trains "
                                         "3 blocks: pass memory_planner="):
        planner_for_model(model, _adamw(model), batch_size=2, seq_len=8, layers=blocks)
    with pytest.raises(ValueError, match="config, which has 4 layers.*memory_planner="):
        ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, layers=blocks, memory_budget="1GiB",
                     memory_shape=(2, 8))


def test_a_model_without_a_config_is_refused_with_the_way_out():
    net = nn.Sequential(*(nn.Linear(4, 4) for _ in range(3)))
    with pytest.raises(ValueError, match="Llama-style causal LMs.*memory_planner="):
        planner_for_model(net, _adamw(net), batch_size=2, seq_len=8, layers=list(net))


def test_trained_embeddings_and_head_are_read_from_the_trainable_parameters():
    model = tiny_llama(2)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert trains_embeddings_and_head(model, [embed]) == (True, False)
    assert trains_embeddings_and_head(model, [head, embed]) == (True, True)
    assert trains_embeddings_and_head(lora_model(2), []) == (False, False)


# ------------------------------------------------------------------ projected optimizers
def _projected_groups(model, **projection):
    """GaLore / APOLLO groups as the HF Trainer sets them up: the blocks' linear weights
    projected, the rest plain."""
    targets = {id(m.weight) for layer in model.model.layers for m in layer.modules()
               if isinstance(m, nn.Linear)}
    params = list(model.parameters())
    return [{"params": [p for p in params if id(p) not in targets]},
            {"params": [p for p in params if id(p) in targets], **projection}]


@pytest.mark.parametrize(("module", "cls", "projection", "expected"), [
    ("apollo_torch", "APOLLOAdamW", {"rank": 1, "proj": "random", "scale_type": "tensor",
                                     "update_proj_gap": 200, "scale": 128.0,
                                     "proj_type": "std"}, ("apollo-mini", 1)),
    ("apollo_torch", "APOLLOAdamW", {"rank": 4, "proj": "random", "scale_type": "channel",
                                     "update_proj_gap": 200, "scale": 1.0,
                                     "proj_type": "std"}, ("apollo", 4)),
    ("galore_torch", "GaLoreAdamW", {"rank": 4, "update_proj_gap": 200, "scale": 0.25,
                                     "proj_type": "std"}, ("galore", 4)),
])
def test_the_planner_reads_galore_and_apollo_from_their_groups(module, cls, projection,
                                                               expected):
    optimizer_cls = getattr(pytest.importorskip(module), cls)
    model = tiny_llama(2)
    optimizer = optimizer_cls(_projected_groups(model, **projection), lr=1e-3)
    assert optimizer_kind(optimizer) == expected
    planner = planner_for_model(model, optimizer, batch_size=2, seq_len=8)
    assert (planner.settings["optimizer"], planner.settings["projection_rank"]) == expected
    adamw = planner_for_model(model, torch.optim.AdamW(model.parameters()), batch_size=2,
                              seq_len=8)
    assert (planner.estimate(None).breakdown["optimizer_state"]
            < adamw.estimate(None).breakdown["optimizer_state"])


def test_memory_budget_plans_the_projected_optimizer_it_wraps():
    from apollo_torch import APOLLOAdamW

    model = tiny_llama(2)
    groups = _projected_groups(model, rank=1, proj="random", scale_type="tensor",
                               update_proj_gap=200, scale=128.0, proj_type="std")
    opt = ISTOptimizer(APOLLOAdamW, model, params=groups, lr=1e-3, seed=0,
                       active_layers=1.0, sampling="uniform", memory_budget="1GiB",
                       memory_shape=(2, 8))
    assert opt.budget_policy.policy.planner.settings["optimizer"] == "apollo-mini"


def test_other_optimizers_are_planned_as_adamw():
    w = nn.Parameter(torch.ones(2, 2))
    assert optimizer_kind(torch.optim.SGD([w], lr=0.1)) == ("adamw", None)
    assert optimizer_kind(torch.optim.AdamW([{"params": [w], "rank": 4}])) == ("adamw", None)
