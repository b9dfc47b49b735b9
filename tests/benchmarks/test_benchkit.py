"""benchmarks/benchkit: the model builders, the data split and blocks, the JSONL rows, the
rate sweep, one protocol per report and the memory anchors the benchmarks share; and the
benchmarks on ist_optim's public names only."""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.benchkit import data, isolated, models, protocol, report, sweep

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("module", [data, models, protocol, report, sweep],
                         ids=lambda m: m.__name__)
def test_the_examples_hold(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0


def test_split_plays_are_disjoint_and_cover_everything():
    train, val, test = data.split_plays([str(i) for i in range(38)], 0.1, 2)
    assert test == [4, 14, 23, 33]  # the held-out plays of quality.py
    assert sorted(train + val + test) == list(range(38)) and len(val) == 2


def test_pick_blocks_random_subset_is_seeded_and_sorted():
    tokens = torch.arange(100)
    a = data.pick_blocks(tokens, 5, 6, torch.Generator().manual_seed(3))
    b = data.pick_blocks(tokens, 5, 6, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (6, 5)
    starts = a[:, 0].tolist()
    assert starts == sorted(starts) and all(s % 5 == 0 for s in starts)
    with pytest.raises(data.CLIError, match="asked for 30 blocks"):
        data.pick_blocks(tokens, 5, 30)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_random_llama_is_seeded_and_leaves_the_global_rng_alone():
    config = models.llama_config(2, 64, vocab=128)
    state = torch.random.get_rng_state()
    a = models.random_llama(config, seed=3, lora_rank=4)
    b = models.random_llama(config, seed=3, lora_rank=4)
    c = models.random_llama(config, seed=4, lora_rank=4)
    assert torch.equal(state, torch.random.get_rng_state())
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert not torch.equal(wa["base_model.model.model.embed_tokens.weight"],
                           wc["base_model.model.model.embed_tokens.weight"])
    lora = {n.split(".")[-4] for n in wa if "lora_A" in n}
    assert lora == set(models.LORA_TARGETS)
    # LoRA from its own seed: the same base weights, other adapters
    d = _weights(models.random_llama(config, seed=3, lora_rank=4, lora_seed=9))
    assert all(torch.equal(wa[n], d[n]) for n in wa if "lora_" not in n)
    assert not all(torch.equal(wa[n], d[n]) for n in wa if "lora_A" in n)


def test_block_loader_batches_blocks_in_order_and_heldout_loss_is_their_mean():
    blocks = torch.arange(36).view(6, 6) % 128
    batches = data.block_loader(blocks, 2, "cpu")
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 6)] * 3
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), blocks)
    assert all(torch.equal(b["labels"], b["input_ids"]) for b in batches)
    assert len(data.block_loader(blocks, 4)) == 1  # whole batches only
    model = models.random_llama(models.llama_config(2, 64, vocab=128), seed=0)
    losses = [data.heldout_loss(model, blocks[i:i + 3], 3) for i in (0, 3)]
    assert data.heldout_loss(model, blocks, 3) == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_rows_are_appended_one_json_line_each_and_read_back(tmp_path):
    path = tmp_path / "runs.jsonl"
    assert report.read_rows([path]) == []  # a first run: no file yet
    report.append_row(path, {"a": 1})
    report.append_row(path, {"b": [1.5]})
    assert report.read_rows([path, tmp_path / "missing.jsonl"]) == [{"a": 1}, {"b": [1.5]}]
    assert path.read_text().count("\n") == 2


# --------------------------------------------------------------------------- public API
def ist_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every import of ``ist_optim`` in ``path``: ``from M import name``,
    and ``import M`` as (M, "")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (
                node.module or "").split(".")[0] == "ist_optim":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "ist_optim"]
    return found


def private_imports(path: Path, packages_only: bool) -> list[str]:
    """The imports of ``path`` that reach past ``ist_optim``'s public names: a name not in
    the ``__all__`` of the module it comes from, and with ``packages_only`` a module that
    is not a package (``ist_optim.cli.train`` instead of ``ist_optim.cli``)."""
    bad = []
    for module_name, name in ist_imports(path):
        module = importlib.import_module(module_name)
        if packages_only and not hasattr(module, "__path__"):
            bad.append(f"{module_name} (a module inside a package)")
        elif name and name not in getattr(module, "__all__", ()):
            bad.append(f"{module_name}.{name} (not in its __all__)")
        elif not name and not hasattr(module, "__path__"):
            bad.append(f"import {module_name}")
    return bad


def test_benchkit_uses_only_package_level_public_names():
    """benchkit imports from ``ist_optim``, ``ist_optim.memory`` and the harness that
    ``ist_optim.cli`` makes public, nothing from a module inside them."""
    bad = {p.name: private_imports(p, packages_only=True)
           for p in (BENCHMARKS / "benchkit").glob("*.py")}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_every_benchmark_imports_only_public_names():
    bad = {str(p.relative_to(BENCHMARKS)): private_imports(p, packages_only=False)
           for p in BENCHMARKS.rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_check_sees_a_private_import(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("from ist_optim.cli.train import evaluate\n"
                      "from ist_optim.sampling.draws import sample_layers\n"
                      "from ist_optim.cli import _HARNESS\n")
    assert private_imports(script, packages_only=True) == [
        "ist_optim.cli.train (a module inside a package)",
        "ist_optim.sampling.draws (a module inside a package)",
        "ist_optim.cli._HARNESS (not in its __all__)"]
    assert private_imports(script, packages_only=False) == [
        "ist_optim.cli._HARNESS (not in its __all__)"]


# --------------------------------------------------------------------------- sweep
rates = st.lists(st.sampled_from([1e-4, 3e-4, 1e-3, 3e-3, 1e-2]), min_size=1, max_size=4,
                 unique=True).map(sorted)


@given(st.dictionaries(st.sampled_from("abc"), rates, min_size=1), st.data())
def test_sweeps_come_first_then_each_chosen_rate_on_every_seed(grids, data):
    methods = sorted(grids)
    seeds = [0, 1, 2]
    left = sweep.next_runs(methods, grids, seeds, [], set())
    swept = [m for m in methods if len(grids[m]) > 1]
    assert left == ([("sweep", m, r, 0) for m in swept for r in grids[m]] or
                    [("final", m, grids[m][0], s) for m in methods for s in seeds])
    points = [(m, r, data.draw(st.floats(1.0, 5.0))) for m in swept for r in grids[m]]
    chosen = sweep.chosen_rates(points)
    for m in swept:
        assert min(v for n, r, v in points if n == m) == next(
            v for n, r, v in points if n == m and r == chosen[m])
    finals = sweep.next_runs(methods, grids, seeds, points, {(methods[0], 9.0, 0)})
    rate = {**chosen, **{m: grids[m][0] for m in methods if len(grids[m]) == 1}}
    assert finals == [("final", m, rate[m], s) for m in methods for s in seeds]
    done = {(m, rate[m], s) for m in methods for s in seeds[:2]}
    assert sweep.next_runs(methods, grids, seeds, points, done) == [
        ("final", m, rate[m], 2) for m in methods]


def test_a_best_edge_is_extended_at_most_max_extensions_times_and_same_rate_follows():
    grids = {"a": (1.0, 2.0), "b": (1.0, 2.0), "c": ()}
    points = [("a", 1.0, 4.0), ("a", 2.0, 3.0), ("b", 1.0, 3.0), ("b", 2.0, 4.0)]
    assert sweep.next_runs(["a", "b"], grids, [0], points, set(), max_extensions=2) == [
        ("sweep", "a", 4.0, 0), ("sweep", "b", 0.5, 0)]
    assert sweep.next_runs(["a", "b"], grids, [0], points, set()) == [
        ("final", "a", 2.0, 0), ("final", "b", 1.0, 0)]  # no extension: the grid as given
    points += [("a", 4.0, 2.0), ("a", 8.0, 1.0), ("b", 0.5, 3.5)]
    assert sweep.next_runs(["a", "b", "c"], grids, [0], points, set(), max_extensions=2,
                           same_rate={"c": "a"}) == [
        ("final", "a", 8.0, 0), ("final", "b", 1.0, 0), ("final", "c", 8.0, 0)]
    rows = [{"method": "a", "lr": lr} for lr in (2.0, 8.0)]
    assert sweep.at_chosen_rates(rows, sweep.chosen_rates(points)) == rows[1:]


# --------------------------------------------------------------------------- protocol
def _protocol_of(row):
    return {k: row[k] for k in ("schedule", "steps", "seq_len") if k in row}


def test_rows_of_two_protocols_are_refused_naming_what_differs():
    rows = [{"schedule": "constant", "steps": 200, "seq_len": 128},
            {"schedule": "linear", "steps": 400, "seq_len": 128}, {"seq_len": 128}]
    with pytest.raises(protocol.ProtocolMismatch) as err:
        protocol.check_one_protocol(rows, _protocol_of)
    assert str(err.value) == (
        "the rows mix protocols: schedule constant / linear, steps 200 / 400; report them "
        "apart with --group-by schedule steps, or give the files of one protocol")
    protocol.check_one_protocol([rows[0], rows[2]], _protocol_of)  # one protocol


def test_one_run_twice_is_refused():
    rows = [{"steps": 200, "m": "a"}, {"steps": 200, "m": "a"}]
    protocol.check_one_protocol(rows, _protocol_of)
    with pytest.raises(protocol.ProtocolMismatch, match="the run a is in the rows twice"):
        protocol.check_one_protocol(rows, _protocol_of, lambda r: r["m"])


def test_groups_take_the_rows_that_carry_their_values_and_the_shared_ones():
    constant = {"schedule": "constant", "steps": 200, "seq_len": 128}
    linear = {"schedule": "linear", "steps": 400, "seq_len": 64}
    shape_128, shared = {"seq_len": 128}, {"note": "no protocol field"}
    groups = protocol.group_rows([constant, linear, shape_128, shared], _protocol_of,
                                 ["schedule", "seq_len"])
    assert groups == {("constant", 128): [constant, shape_128, shared],
                      ("linear", 64): [linear, shared]}
    with pytest.raises(protocol.ProtocolMismatch, match="--group-by sched: no row carries"):
        protocol.group_rows([constant], _protocol_of, ["sched"])
    with pytest.raises(protocol.ProtocolMismatch, match="seq_len 64 / 128"):  # in a group
        protocol.protocol_groups([constant, linear, shape_128], _protocol_of, ["schedule"])
    checked = protocol.protocol_groups([constant, linear, shape_128], _protocol_of,
                                       ["schedule", "seq_len"])
    assert [title for title, _rows in checked] == ["## schedule constant, seq_len 128",
                                                   "## schedule linear, seq_len 64"]


def test_a_configuration_runs_in_its_own_process_and_returns_its_last_row(tmp_path, capsys):
    row = tmp_path / "row.json"
    row.write_text('{"config": "a", "step_ms": 1.5}')
    assert isolated.run_isolated("json.tool", ["--compact", str(row)]) == {
        "config": "a", "step_ms": 1.5}
    assert isolated.run_isolated("json.tool", [str(tmp_path / "missing.json")]) is None
    assert "missing.json failed:" in capsys.readouterr().err
