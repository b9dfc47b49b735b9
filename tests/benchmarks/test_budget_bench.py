"""benchmarks/budget.py: the budget measured from LoRA + GC, runs inside it (IST's peaks
accounted within the budget), sweep then seeds, resume, the equal-time report; on a tiny
random-init Llama (nothing downloaded)."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama_dir
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.budget import cli as budget
from benchmarks.budget import methods as budget_methods
from benchmarks.budget import plan as budget_plan
from benchmarks.budget import report as budget_report
from benchmarks.budget import run as budget_run


@given(st.lists(st.floats(0.01, 5.0), min_size=2, max_size=30), st.data())
def test_at_time_interpolates_between_eval_points(seconds, data):
    steps = len(seconds)
    evals = [{"step": 0, "test": 5.0}, {"step": steps, "test": 3.0}]
    run = {"cpu_seconds": seconds, "evals": evals}
    total = sum(seconds)
    t = data.draw(st.floats(0.0, total))
    assert budget_report.at_time(run, t) == pytest.approx(5.0 - 2.0 * t / total)
    past = total * 1.01 + 1e-9
    assert budget_report.at_time(run, past) != budget_report.at_time(run, past)  # NaN


def _sweep(method, *rate_loss):
    return [{"phase": "sweep", "method": method, "lr": lr, "seed": 0, "evals": [{"val": v}]}
            for lr, v in rate_loss]


def test_plan_sweeps_every_method_then_runs_each_chosen_rate_on_every_seed():
    grids = {"a": (1.0, 2.0, 4.0), "b": (3.0,)}
    assert budget_plan.todo(["a", "b"], grids, [0, 1], []) == [
        ("sweep", "a", 1.0, 0), ("sweep", "a", 2.0, 0), ("sweep", "a", 4.0, 0)]
    rows = _sweep("a", (1.0, 4.0), (2.0, 3.0), (4.0, 3.5))
    assert budget_plan.todo(["a", "b"], grids, [0, 1], rows) == [
        ("final", "a", 2.0, 0), ("final", "a", 2.0, 1), ("final", "b", 3.0, 0),
        ("final", "b", 3.0, 1)]


def test_a_sweep_whose_best_rate_is_an_edge_is_extended_past_it():
    grids = {"up": (1.0, 2.0), "down": (1.0, 2.0)}
    rows = _sweep("up", (1.0, 4.0), (2.0, 3.0)) + _sweep("down", (1.0, 3.0), (2.0, 4.0))
    assert budget_plan.todo(["up", "down"], grids, [0], rows) == [("sweep", "up", 4.0, 0),
                                                             ("sweep", "down", 0.5, 0)]
    # an explicit grid (--lrs) is run as given
    assert budget_plan.todo(["up"], grids, [0], rows, extend=False) == [("final", "up", 2.0, 0)]
    # at most MAX_EXTENSIONS rates are added; then the best swept rate runs
    rows += _sweep("up", (4.0, 2.0), (8.0, 1.0)) + _sweep("down", (0.5, 3.5))
    assert budget_plan.MAX_EXTENSIONS == 2
    assert budget_plan.todo(["up", "down"], grids, [0], rows) == [("final", "up", 8.0, 0),
                                                             ("final", "down", 1.0, 0)]
    # finals run at an earlier choice are superseded in the report and the plot
    finals = [{"phase": "final", "method": "up", "lr": lr, "seed": 0} for lr in (2.0, 8.0)]
    assert budget_plan.final_runs(rows + finals) == finals[1:]


@pytest.mark.parametrize("name", list(budget_methods.METHODS))
def test_every_method_is_well_formed_and_its_ist_keywords_are_valid(name):
    from ist_optim import ISTConfig

    method = budget_methods.METHODS[name]
    assert method.peft in ("lora", "dora", "full", "qlora")
    assert method.optimizer in ("adamw", "ist", "badam", "galore", "apollo", "apollo-mini")
    assert method.checkpointing in ("model", "budget")
    assert method.optimizer not in budget_methods.PROJECTED or method.peft == "full"
    assert budget_methods.budget_of(name) == ("qlora+gc" if method.peft == "qlora"
                                              else "lora+gc")
    assert method.checkpointing == "budget" or not method.ist_kwargs
    if method.optimizer == "ist":  # as budget_run.build passes them, with the budget
        ISTConfig(**method.ist_kwargs, memory_budget=2**30, memory_shape=(4, 128))
    assert budget_methods.lr_grid(name) in (budget_methods.LR_GRID, budget_methods.FULL_LR_GRID)
    assert name in budget.build_parser().parse_args(["--methods", name]).methods


def test_full_fine_tuning_sweeps_lower_rates():
    assert budget_methods.lr_grid("lora+gc") == (5e-4, 1e-3, 2e-3, 4e-3)
    assert max(budget_methods.lr_grid("full+ist-3+budget")) < max(budget_methods.lr_grid("lora+gc"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    words = ("love night crown sword grief honour fortune heaven blood king fair sweet "
             "death time heart eyes").split()
    plays = tmp_path_factory.mktemp("plays")
    texts = []
    for i in range(10):
        rng = __import__("random").Random(i)
        texts.append("\n".join(" ".join(rng.choice(words) for _ in range(7))
                               for _ in range(300)))
        (plays / f"play{i}.txt").write_text(texts[-1])
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"), texts), plays


def _args(tiny, out, *extra):
    model, plays = tiny
    return ["--model", str(model), "--data", str(plays), "--batch-size", "4", "--seq-len", "32",
            "--eval-blocks", "8", "--eval-batch", "4", "--rank", "2", "--sweep-steps", "2",
            "--steps", "4", "--eval-every", "2", "--seeds", "0", "1", "--out", str(out),
            *extra]


def test_end_to_end_inside_the_budget_resume_and_report(tiny, tmp_path):
    out = tmp_path / "runs.jsonl"
    args = _args(tiny, out, "--methods", "lora+gc", "lora+ist-fo-da+budget", "lora+budget",
                 "--lrs", "1e-3", "1e-2", "--margin", "0.6")
    rng = torch.random.get_rng_state()
    assert budget.main(args + ["--max-runs", "3"]) == 0
    assert budget.main(args) == 0
    assert torch.equal(rng, torch.random.get_rng_state())  # global RNG untouched
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    limit = rows[0]
    assert limit["phase"] == "budget"
    assert limit["lora_peak_bytes"] > limit["budget_bytes"] >= limit["lora_gc_peak_bytes"]
    # the IST methods' easiest steps were planned first: they fit
    assert [(r["method"], r["fits"]) for r in rows if r.get("phase") == "fit"] == [
        ("lora+ist-fo-da+budget", True), ("lora+budget", True)]
    runs = [r for r in rows if r.get("phase") in ("sweep", "final")]
    names = ["lora+gc", "lora+ist-fo-da+budget", "lora+budget"]
    assert [(r["phase"], r["method"], r["seed"]) for r in runs] == [
        *[("sweep", m, 0) for m in names for _ in range(2)],
        *[("final", m, s) for m in names for s in (0, 1)]]
    chosen = budget_plan.chosen_lrs(runs)
    for r in runs:
        assert r["peak_bytes"] <= limit["budget_bytes"], (r["method"], r["peak_bytes"])
        assert 1 in r["accounted_steps"] and len(r["cpu_seconds"]) == r["steps"]
        if r["phase"] == "final":
            assert r["lr"] == chosen[r["method"]]
            assert [e["step"] for e in r["evals"]] == [0, 2, 4]
    finals = {(r["method"], r["seed"]): r for r in runs if r["phase"] == "final"}
    # the same seed and batches: the first-step loss is the same for every method
    assert finals["lora+gc", 1]["train_losses"][0] == pytest.approx(
        finals["lora+ist-fo-da+budget", 1]["train_losses"][0])
    # lora+budget (every layer active in ISTOptimizer under memory_budget) makes the updates
    # of lora+gc, step for step; it only recomputes fewer blocks
    for seed in (0, 1):
        gc, budgeted = finals["lora+gc", seed], finals["lora+budget", seed]
        assert gc["train_losses"] == budgeted["train_losses"]
        assert [e["test"] for e in gc["evals"]] == [e["test"] for e in budgeted["evals"]]
        assert 0 < max(budgeted["checkpointed_blocks"]) < 4
    text = budget_report.report(rows)
    assert "Paired test-loss differences vs lora+gc" in text and "equal CPU time" in text
    budget_report.plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_a_margin_that_lets_lora_without_checkpointing_fit_is_refused(tiny, tmp_path):
    with pytest.raises(SystemExit, match="lower --margin"):
        budget.main(_args(tiny, tmp_path / "r.jsonl", "--methods", "lora+gc", "--margin", "5"))


def test_a_method_that_cannot_fit_the_budget_is_recorded_and_not_run(tiny, tmp_path):
    # Full fine-tuning of 3 of the 4 tiny blocks holds their gradients and Adam state on top
    # of everything LoRA + GC needs: it cannot fit a budget 2% over LoRA + GC's peak.
    out = tmp_path / "runs.jsonl"
    args = _args(tiny, out, "--methods", "full+ist-3+budget", "lora+ist-fo-da+budget",
                 "--lrs", "1e-3", "--seeds", "0", "--margin", "0.02")
    assert budget.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    fit = {r["method"]: r for r in rows if r.get("phase") == "fit"}
    assert not fit["full+ist-3+budget"]["fits"]
    assert fit["full+ist-3+budget"]["best_case_peak_bytes"] > fit["full+ist-3+budget"][
        "limit_bytes"]
    assert fit["full+ist-3+budget"]["active_layers"] == [1, 2, 3]
    assert fit["lora+ist-fo-da+budget"]["fits"]
    runs = [(r["method"], r["phase"]) for r in rows if r.get("phase") in ("sweep", "final")]
    assert runs == [("lora+ist-fo-da+budget", "final")]
    assert "Not run, cannot fit the budget: `full+ist-3+budget`" in budget_report.report(rows)
    assert budget.main(args) == 0  # a rerun neither checks again nor runs it
    assert out.read_text().count('"phase": "fit"') == 2


def final_row(method, evals, *, phase="final", lr=1e-3, seed=0, step_cost=1.0):
    """A run as the benchmark writes it, of ``evals[-1]["step"]`` steps."""
    steps = evals[-1]["step"]
    return {"phase": phase, "method": method, "lr": lr, "seed": seed, "steps": steps,
            "budget_bytes": 10, "peak_bytes": 5, "cpu_seconds": [step_cost] * steps,
            "cpu_seconds_per_step": step_cost, "checkpointed_blocks": [1] * steps,
            "evals": evals}


def test_ist_is_paired_with_the_layer_wise_peers_seed_by_seed():
    def run(method, seed, final, step_cost):
        return final_row(method, [{"step": 0, "test": 5.0}, {"step": 2, "test": final}],
                         seed=seed, step_cost=step_cost)

    rows = [run("lora+gc", s, 3.0, 2.0) for s in (0, 1)]
    rows += [run("lora+ist-fo-da+budget", s, 3.5 - 0.1 * s, 1.0) for s in (0, 1)]
    rows += [run("lisa+budget", s, 3.8, 1.0) for s in (0, 1)]
    text = budget_report.report(rows)
    peers = text.split("IST with adapters vs the full-parameter peers")[1]
    lines = [line for line in peers.splitlines() if " vs lisa" in line]
    assert lines[0].startswith("| lora+ist-fo-da+budget vs lisa+budget | equal steps | "
                               "-0.3000, -0.4000 | -0.3500 | 2/2 | 1.00 |")
    assert "equal CPU time" in lines[1] and len(lines) == 2  # BAdam did not run: no row


def test_the_gap_over_training_is_reported_per_eval_step_and_the_examples_hold():
    def run(method, seed, tests):
        return final_row(method, [{"step": 10 * i, "test": t} for i, t in enumerate(tests)],
                         seed=seed)

    rows = [run("lora+gc", s, (5.0, 4.0, 3.0)) for s in (0, 1)]
    rows += [run("lora+ist-fo-da+budget", 0, (5.0, 4.5, 3.5)),
             run("lora+ist-fo-da+budget", 1, (5.0, 4.3, 3.1))]
    gap = budget_report.report(rows).split("The gap over training")[1]
    assert "| lora+ist-fo-da+budget | 2 | +0.400 | +0.300 |" in gap
    assert "| lora+gc |" not in gap



@pytest.mark.parametrize("module", [budget, budget_methods, budget_plan, budget_report,
                                    budget_run], ids=lambda m: m.__name__)
def test_the_examples_of_every_part_hold(module):
    result = doctest.testmod(module)
    assert result.failed == 0
    if module is not budget:  # the command line has none; every part shows its use
        assert result.attempted > 0


def test_a_final_at_a_rate_other_than_the_chosen_one_is_shown_apart():
    def row(phase, method, lr, loss, step_cost=1.0):
        return final_row(method, [{"step": 0, "val": 5.0, "test": 5.0},
                                  {"step": 2, "val": loss, "test": loss}],
                         phase=phase, lr=lr, step_cost=step_cost)

    ist = "lora+ist+budget"
    rows = [row("sweep", ist, 1e-3, 3.0), row("sweep", ist, 2e-3, 3.2),
            row("final", ist, 1e-3, 3.1), row("final", ist, 2e-3, 3.4, step_cost=2.0),
            row("final", "lora+gc", 1e-3, 3.1)]
    head, others = budget_report.report(rows).split("Finals at a rate other than")
    assert f"| {ist} | 0.001 | 0 |" in head and f"| {ist} | 0.002 | 0 |" not in head
    # vs lora+gc at its 2 CPU s: 4.2 (half way through the 4 s run) against 3.1
    assert f"| {ist} | 0.002 | 0 | 3.4000 | 0.001 | 3.1000 | +0.3000 | +0.3000 | +1.1000 |" \
        in others


def test_a_budget_measured_at_the_same_shape_is_reused_and_another_shape_is_not(tmp_path):
    args = budget.build_parser().parse_args(["--out", str(tmp_path / "runs.jsonl")])
    args.batch_size, args.seq_len = 4, 128
    shape = {"phase": "budget", "device": "cpu", "model": "smollm2-135m", "batch_size": 4,
             "seq_len": 128, "margin": 0.10}
    rows = [{**shape, "budget_bytes": 1}, {**shape, "margin": 0.2, "budget_bytes": 2},
            {**shape, "budget_bytes": 3}]
    assert budget_run.ensure_budget(rows, None, args, {}) == 3  # the last at this shape
    assert not args.out.exists()  # nothing measured, nothing written


# --------------------------------------------------------------------------- issue 24
def _rows(out):
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_qlora_has_a_budget_of_its_own_that_its_ist_methods_run_inside(tiny, tmp_path):
    """qlora+gc sets the QLoRA budget (a budget row of its own; the main budget is not
    measured when no method needs it); QLoRA + IST is planned and runs inside it, from the
    4-bit base's step-0 losses, and pairs with qlora+gc in the report."""
    out = tmp_path / "runs.jsonl"
    methods = ["qlora+gc", "qlora+ist+budget", "qlora+uniform-dense50+budget"]
    args = _args(tiny, out, "--methods", *methods, "--lrs", "1e-3", "--seeds", "0",
                 "--steps", "3", "--eval-every", "3", "--margin", "0.6")
    assert budget.main(args) == 0
    rows = _rows(out)
    budgets = [r for r in rows if r.get("phase") == "budget"]
    assert len(budgets) == 1 and budgets[0]["budget_of"] == "qlora+gc"
    limit = budgets[0]
    assert limit["qlora_peak_bytes"] > limit["budget_bytes"] >= limit["qlora_gc_peak_bytes"]
    fits = {r["method"]: r for r in rows if r.get("phase") == "fit"}
    assert set(fits) == set(methods[1:])
    assert all(r["fits"] and r["budget_of"] == "qlora+gc"
               and r["budget_bytes"] == limit["budget_bytes"] for r in fits.values())
    finals = {r["method"]: r for r in rows if r.get("phase") == "final"}
    assert set(finals) == set(methods)
    for r in finals.values():
        assert r["budget_bytes"] == limit["budget_bytes"] >= r["peak_bytes"]
        assert len(r["train_losses"]) == 3 and [e["step"] for e in r["evals"]] == [0, 3]
    # the 4-bit base is what every QLoRA run starts from: the same step 0, the same first
    # loss (LoRA's B = 0)
    assert finals["qlora+gc"]["evals"][0] == finals["qlora+ist+budget"]["evals"][0]
    assert finals["qlora+gc"]["train_losses"][0] == pytest.approx(
        finals["qlora+ist+budget"]["train_losses"][0])
    text = budget_report.report(rows)
    assert "QLoRA budget: QLoRA all (4-bit NF4 base) + GC" in text
    qlora = text.split("Paired test-loss differences vs qlora+gc inside the QLoRA budget")[1]
    assert "| qlora+ist+budget | equal steps |" in qlora
    assert "| qlora+uniform-dense50+budget | equal CPU time |" in qlora
    assert "Paired test-loss differences vs lora+gc" not in text  # lora+gc did not run


def test_galore_and_apollo_run_where_their_measured_peak_fits(tiny, tmp_path):
    """Full fine-tuning with GaLoreAdamW / APOLLOAdamW on the blocks' matrices: two
    accounted steps check the fit (the planner's figures recorded beside them), then the
    runs; their peaks are accounted and the blocks' weights move."""
    model, _plays = tiny
    out = tmp_path / "runs.jsonl"
    shape = {"phase": "budget", "budget_of": "lora+gc", "device": "cpu", "model": str(model),
             "batch_size": 4, "seq_len": 32, "margin": 0.1, "lora_gc_peak_bytes": 1,
             "lora_peak_bytes": 2, "budget_bytes": 2**40}
    out.write_text(json.dumps(shape) + "\n")  # a budget every method fits
    methods = ["galore+gc", "apollo+gc", "apollo-mini+gc"]
    assert budget.main(_args(tiny, out, "--methods", *methods, "--lrs", "1e-3", "--seeds", "0",
                             "--steps", "2")) == 0
    rows = _rows(out)
    fits = {r["method"]: r for r in rows if r.get("phase") == "fit"}
    assert set(fits) == set(methods)
    for r in fits.values():
        assert r["fits"] and r["measured_steps"] == 2
        assert 0 < r["measured_peak_bytes"] and 0 < r["planned_layerwise_peak_bytes"]
        # (APOLLO's rank 128 is above the tiny blocks' 32 channels: its projector is not
        # capped at min(m, n), and the planner knows it)
        assert r["planned_peak_bytes"] == pytest.approx(r["measured_peak_bytes"], rel=0.15)
    finals = {r["method"]: r for r in rows if r.get("phase") == "final"}
    assert set(finals) == set(methods)
    assert all(r["peak_bytes"] > 0 and len(r["train_losses"]) == 2 for r in finals.values())
    # the optimizer: the blocks' linear weights projected, the norms plain; all of them move
    from benchmarks.benchkit import models
    args = budget.build_parser().parse_args(_args(tiny, out))
    args.dtype = torch.float32
    for name in methods:
        net, opt = budget_run.build(budget_methods.METHODS[name], 1e-2, 0, args, None)
        assert type(opt).__name__ == "AdamW" and type(opt).__module__.split(".")[0] in (
            "galore_torch", "apollo_torch")
        plain, projected = opt.param_groups
        assert len(projected["params"]) == 4 * 7 and len(plain["params"]) == 4 * 2
        assert projected["rank"] == models.PROJECTION_GROUPS[
            budget_methods.METHODS[name].optimizer]["rank"]
        before = [p.detach().clone() for p in net.parameters() if p.requires_grad]
        ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        after = [p for p in net.parameters() if p.requires_grad]
        assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_a_projected_method_over_the_budget_is_reported_with_the_planner_figure(tiny,
                                                                                tmp_path):
    model, _plays = tiny
    out = tmp_path / "runs.jsonl"
    shape = {"phase": "budget", "device": "cpu", "model": str(model), "batch_size": 4,
             "seq_len": 32, "margin": 0.1, "lora_gc_peak_bytes": 1000,
             "lora_peak_bytes": 2000, "budget_bytes": 1100}  # an older row: no budget_of
    out.write_text(json.dumps(shape) + "\n")
    args = _args(tiny, out, "--methods", "galore+gc", "--lrs", "1e-3", "--seeds", "0")
    assert budget.main(args) == 0
    rows = _rows(out)
    (fit,) = [r for r in rows if r.get("phase") == "fit"]
    assert not fit["fits"] and fit["measured_peak_bytes"] > fit["budget_bytes"] == 1100
    assert not [r for r in rows if r.get("phase") in ("sweep", "final")]
    text = budget_report.report(rows)
    planned = fit["planned_peak_bytes"] / 2**20
    assert (f"Not run, cannot fit the budget: `galore+gc` (measured at "
            f"{fit['measured_peak_bytes'] / 2**20:.1f} MiB over 2 accounted steps") in text
    assert f"the planner predicts {planned:.1f} MiB" in text
    assert budget.main(args) == 0  # a rerun neither measures again nor runs it
    assert out.read_text().count('"phase": "fit"') == 1


def test_qlora_rows_pair_with_qlora_gc_and_projected_peers_with_ist():
    def run(method, seed, final, step_cost):
        return final_row(method, [{"step": 0, "test": 5.0}, {"step": 2, "test": final}],
                         seed=seed, step_cost=step_cost)

    rows = [run("lora+gc", s, 3.0, 2.0) for s in (0, 1)]
    rows += [run("lora+ist-fo-da+budget", s, 3.5, 1.0) for s in (0, 1)]
    rows += [run("galore+gc", s, 3.9, 2.0) for s in (0, 1)]
    rows += [run("qlora+gc", s, 3.2, 4.0) for s in (0, 1)]
    rows += [run("qlora+ist+budget", s, 3.4 + 0.1 * s, 2.0) for s in (0, 1)]
    text = budget_report.report(rows)
    main, qlora = text.split("Paired test-loss differences vs lora+gc")[1].split(
        "Paired test-loss differences vs qlora+gc inside the QLoRA budget")
    # qlora+gc against lora+gc (the 4-bit base's cost); QLoRA + IST against qlora+gc only
    assert "| qlora+gc | equal steps | +0.2000, +0.2000 | +0.2000 | 0/2 | 2.00 |" in main
    assert "| qlora+ist+budget |" not in main and "| qlora+gc |" not in qlora
    assert "| qlora+ist+budget | equal steps | +0.2000, +0.3000 | +0.2500 | 0/2 | 0.50 |" \
        in qlora
    assert "worth qlora+gc steps" in qlora
    peers = main.split("IST with adapters vs the full-parameter peers")[1]
    assert "| lora+ist-fo-da+budget vs galore+gc | equal steps | -0.4000, -0.4000 |" in peers


def test_each_budget_is_reused_only_for_its_own_baseline(tmp_path):
    args = budget.build_parser().parse_args(["--out", str(tmp_path / "runs.jsonl")])
    args.batch_size, args.seq_len = 4, 128
    shape = {"phase": "budget", "device": "cpu", "model": "smollm2-135m", "batch_size": 4,
             "seq_len": 128, "margin": 0.10}
    rows = [{**shape, "budget_bytes": 1}, {**shape, "budget_of": "qlora+gc", "budget_bytes": 2},
            {**shape, "budget_of": "lora+gc", "budget_bytes": 3}]
    assert budget_run.ensure_budget(rows, None, args, {}) == 3
    assert budget_run.ensure_budget(rows[:2], None, args, {}) == 1  # older rows: lora+gc's
    assert budget_run.ensure_budget(rows, None, args, {}, "qlora+gc") == 2
    args.methods = ["qlora+ist+budget", "lora+gc", "galore+gc"]
    assert budget_run.ensure_budgets(rows, None, args, {}) == {
        "qlora+ist+budget": 2, "lora+gc": 3, "galore+gc": 3}
    assert not args.out.exists()


def test_two_processes_on_one_out_file_share_the_runs(tiny, tmp_path):
    """Two processes started together on one --out: one measures the budget, the other
    reads it; every sweep and final run is written exactly once, by one of the two, and
    the finals run at the rates the sweep chose."""
    import os
    import subprocess
    import sys


    out = tmp_path / "runs.jsonl"
    argv = _args(tiny, out, "--methods", "lora+gc", "lora+uniform+budget",
                 "--lrs", "1e-3", "1e-2", "--margin", "0.6")
    root = Path(budget.__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    code = ("import sys; from benchmarks.budget import cli, run; "
            "run.CLAIM_POLL_SECONDS = 0.2; sys.exit(cli.main(sys.argv[1:]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, *argv], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    rows = _rows(out)
    assert len([r for r in rows if r.get("phase") == "budget"]) == 1
    runs = [(r["phase"], r["method"], r["lr"], r["seed"]) for r in rows
            if r.get("phase") in ("sweep", "final")]
    assert len(runs) == len(set(runs)) == 8  # 2 methods x 2 rates, then 2 methods x 2 seeds
    assert budget_plan.todo(["lora+gc", "lora+uniform+budget"],
                            {m: (1e-3, 1e-2) for m in ("lora+gc", "lora+uniform+budget")},
                            [0, 1], rows, extend=False) == []
    claims = [r for r in rows if r.get("phase") == "claim"]
    assert sorted(budget_plan.claim_key(r) for r in claims) == sorted(runs)
    assert len({r["pid"] for r in claims}) == 2  # both processes ran some
    assert budget_report.report(rows)  # the claim rows do not disturb the report


def test_a_claim_lapses_with_its_process():
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    assert budget_run.claim_alive({"host": here, "pid": os.getpid()})
    assert not budget_run.claim_alive({"host": here, "pid": dead.pid})
    assert budget_run.claim_alive({"host": here + "-elsewhere", "pid": dead.pid})
    claim = {"phase": "claim", "run_phase": "sweep", "method": "a", "lr": 1.0, "seed": 0,
             "host": here, "pid": dead.pid}
    left = [("sweep", "a", 1.0, 0)]
    assert budget_plan.unclaimed(left, [claim], budget_run.claim_alive) == left
    assert budget_plan.unclaimed(left, [{**claim, "pid": os.getpid()}],
                                 budget_run.claim_alive) == []


# --------------------------------------------------------------------------- protocols
RESULTS = Path(budget.__file__).resolve().parents[1] / "results" / "budget"


def test_report_refuses_the_mix_of_the_constant_rate_and_linear_studies(capsys):
    """Every results file of the budget benchmark at once (the docs' old command, whose
    rows keyed by method and seed overwrote each other: first-order IST came out +0.098 /
    +0.083) is refused with one line naming what differs; grouped as it says, the
    constant-rate study reports its published +0.0727 / +0.0641."""
    files = sorted(str(p) for p in RESULTS.glob("*/runs*.jsonl"))
    assert budget.main(["--report", *files]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(
        "python -m benchmarks.budget: error: the rows mix protocols: ")
    assert "schedule constant / linear" in err and "seq_len 128 / 64" in err
    fields = err.split("report them apart with --group-by ")[1].split(", or give")[0]
    assert budget.main(["--report", *files, "--group-by", *fields.split()]) == 0
    groups = capsys.readouterr().out.split("## ")[1:]
    assert len(groups) == 3
    constant = next(g for g in groups if "schedule constant" in g.split("\n")[0])
    assert "| lora+ist-fo-da+budget | equal steps | +0.0784, +0.0738, +0.0659 | +0.0727 |" in (
        constant)
    assert "| lora+ist-fo-da+budget | equal CPU time | +0.0677, +0.0498, +0.0749 | +0.0641 |" in (
        constant)


def test_plotting_several_groups_and_grouping_a_run_are_refused(tmp_path, capsys):
    files = [str(RESULTS / "constant-rate" / "runs-lora.jsonl"),
             str(RESULTS / "linear-400-steps" / "runs.jsonl")]
    argv = ["--report", *files, "--group-by", "seq_len", "budget:lora+gc", "--plot",
            str(tmp_path / "c.png")]
    assert budget.main(argv) == 2
    assert "--plot draws one protocol, --group-by made 2" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()
    assert budget.main(["--group-by", "schedule"]) == 2
    assert "--group-by groups the rows of --report" in capsys.readouterr().err


def test_one_run_in_two_files_and_sweeps_of_two_lengths_are_refused(tmp_path, capsys):
    one = str(RESULTS / "linear-400-steps" / "runs.jsonl")
    assert budget.main(["--report", one, one]) == 2
    assert "is in the rows twice" in capsys.readouterr().err
    rows = _rows(Path(one))
    sweep = next(r for r in rows if r.get("phase") == "sweep")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({**sweep, "steps": 50, "lr": 1.0}) + "\n")
    assert budget.main(["--report", one, str(short)]) == 2
    assert "the rows mix sweeps of 50 / 400 steps" in capsys.readouterr().err


def test_a_cuda_run_reads_its_peaks_with_the_librarys_meter(monkeypatch):
    """Each CUDA step's peak is :class:`ist_optim.memory.PeakMemory`'s (the meter of
    ``ist-finetune`` and the memory study), on the run's device."""
    from ist_optim.memory import PeakMemory

    calls = []
    for name, value in (("reset_peak_memory_stats", None), ("memory_allocated", 3),
                        ("max_memory_allocated", 7), ("synchronize", None)):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, name=name, value=value:
                            calls.append((name, device)) or value)
    peaks = budget_run.StepPeaks("cuda", None, None)
    assert isinstance(peaks.meter, PeakMemory) and not peaks.wants(1, None)
    assert peaks.run(1, lambda: calls.append(("step", None)), None) is False
    assert peaks.peak == 7 and peaks.accounted == []
    assert [c[0] for c in calls] == ["reset_peak_memory_stats", "memory_allocated", "step",
                                     "synchronize", "max_memory_allocated"]
    assert {c[1] for c in calls} == {torch.device("cuda"), None}
