"""Module paths that moved keep importing the same objects (docs and earlier code use them)."""

from __future__ import annotations

import importlib

import pytest

import ist_optim

MOVED = [
    ("ist_optim.memory", "MemoryPlanner", "ist_optim.planner.estimate"),
    ("ist_optim.memory", "LiveMemory", "ist_optim.planner.tracker"),
    ("ist_optim.memory", "load_config", "ist_optim.planner.shapes"),
    ("ist_optim.memory", "account_step", "ist_optim.planner.accounting"),
    ("ist_optim.memory.budget", "planner_for_model", "ist_optim.planner.from_model"),
    ("ist_optim.memory.projection", "projected_step", "ist_optim.planner.projection"),
    ("ist_optim.memory.quantized", "QuantSpec", "ist_optim.planner.quantized"),
    ("ist_optim.memory.shapes", "SHAPES", "ist_optim.planner.shapes"),
    ("ist_optim.importance.estimators", "FirstOrderProbe", "ist_optim.importance.first_order"),
    ("ist_optim.importance.estimators", "normalized_score_update",
     "ist_optim.importance.normalized"),
    ("ist_optim.importance.estimators", "RunningScale", "ist_optim.importance.normalized"),
    ("ist_optim.importance.rounds", "ImportanceRound", "ist_optim.importance.rounds"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_an_old_path_gives_the_object_of_its_new_home(old, name, new):
    assert getattr(importlib.import_module(old), name) is getattr(
        importlib.import_module(new), name)


def test_every_public_name_still_imports_from_the_package():
    for name in ist_optim.__all__:
        assert getattr(ist_optim, name) is not None
