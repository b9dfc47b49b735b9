"""benchmarks/frontier: the pure parts (budget spacing and the blocks a budget forces, the
interleaved order, the ideal time, the loss at a fixed CPU time, the report from synthetic
rows); nothing is trained or timed here."""

from __future__ import annotations

import doctest
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.frontier import budgets, methods, predict, report, timing

MIB = 2**20


@pytest.mark.parametrize("module", [budgets, methods, predict, report, timing])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


@given(st.integers(1, 10**10), st.integers(0, 10**10), st.integers(2, 12))
def test_budgets_are_evenly_spaced_from_low_to_high(low, span, count):
    out = budgets.spaced_budgets(low, low + span, count)
    assert len(out) == count and out[0] == low and out[-1] == low + span
    gaps = [b - a for a, b in zip(out, out[1:], strict=False)]
    assert all(g >= 0 for g in gaps) and max(gaps) - min(gaps) <= 1


def test_budgets_refuse_fewer_than_two_or_a_reversed_range():
    with pytest.raises(ValueError, match="at least 2"):
        budgets.spaced_budgets(1, 2, 1)
    with pytest.raises(ValueError, match="above the highest"):
        budgets.spaced_budgets(3, 2, 3)


def test_budgets_given_are_read_with_the_library_byte_parser():
    assert budgets.parse_budgets(["1.5GiB", "950MiB"]) == [950 * MIB, int(1.5 * 2**30)]
    with pytest.raises(ValueError, match="no unit"):
        budgets.parse_budgets(["950"])


@given(st.integers(2, 64), st.integers(1, 10**9), st.integers(1, 10**9), st.data())
def test_forced_blocks_are_the_fewest_that_fit(layers, gc_peak, span, data):
    plain = gc_peak + span
    budget = data.draw(st.integers(gc_peak, plain))
    n = budgets.forced_blocks(budget, gc_peak=gc_peak, plain_peak=plain, layers=layers)
    saved = span / (layers - 1)
    assert 0 <= n <= layers - 1
    assert plain - n * saved <= budget + 1e-6 * plain  # n blocks fit
    if n > 0:
        assert plain - (n - 1) * saved > budget - 1e-6 * plain  # n - 1 do not
    assert budgets.forced_blocks(gc_peak - 1, gc_peak=gc_peak, plain_peak=plain,
                                 layers=layers) == layers


@given(st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=7, unique=True),
       st.integers(0, 5), st.integers(1, 3), st.integers(0, 3))
def test_interleaving_gives_every_method_its_steps_each_round(names, rounds, per_turn, warmup):
    order = timing.interleaved_order(names, rounds=rounds, per_turn=per_turn, warmup=warmup)
    assert order[:warmup * len(names)] == [(m, False) for _ in range(warmup) for m in names]
    counted = [m for m, c in order if c]
    assert len(counted) == rounds * per_turn * len(names)
    size = per_turn * len(names)
    for r in range(rounds):  # each round: every method, per_turn steps in a row, rotated
        block = counted[r * size:(r + 1) * size]
        assert sorted(block) == sorted(names * per_turn)
        assert block[0] == names[r % len(names)]


def test_ideal_time_adds_the_recomputation_of_the_forced_blocks():
    assert report.ideal_time(4.0, 5.0, forced=0, layers=30) == 4.0
    assert report.ideal_time(4.0, 5.0, forced=30, layers=30) == pytest.approx(5.0)
    assert report.ideal_time(4.0, 5.0, forced=15, layers=30) == pytest.approx(4.5)
    assert report.excess(4.5, 4.5) == 0.0


@given(st.floats(0.5, 10.0), st.integers(1, 50), st.data())
def test_loss_at_time_reads_the_curve_at_time_over_step_time(step_time, steps, data):
    curve = {"evals": [{"step": 0, "test": 5.0}, {"step": steps, "test": 3.0}]}
    clock = [step_time] * steps
    total = sum(clock)  # the run's end, as summed (not step_time * steps: rounding)
    t = data.draw(st.floats(0.0, total))
    got = report.loss_at_time([curve], clock, t)
    assert got == pytest.approx(5.0 - 2.0 * t / total)  # the curve at step t / step_time
    assert math.isnan(report.loss_at_time([curve], clock, total * 1.01 + 1e-6))


def test_the_ist_recipe_runs_its_dense_steps_at_lora_budget_time():
    assert methods.phase_steps("ist-sparse+budget", 200) == {"lora+budget": 100,
                                                             "ist-sparse+budget": 100}
    times = {(1, "lora+budget"): {"cpu_seconds": [4.0, 4.0, 9.0]},
             (1, "ist-sparse+budget"): {"cpu_seconds": [3.0]}}
    assert report.clock("ist-sparse+budget", 1, times, 200) == [4.0] * 100 + [3.0] * 100
    assert report.clock("ist-sparse+budget", 2, times, 200) is None


def _time(method, budget, seconds, blocks, k=None):
    return {"phase": "time", "method": method, "budget_bytes": budget, "layers": 30,
            "cpu_seconds": seconds, "checkpointed_blocks": blocks, "k": k}


def _final(method, seed, losses):
    return {"phase": "final", "method": method, "lr": 1e-3, "seed": seed, "steps": 200,
            "cpu_seconds": [1.0] * 200,
            "evals": [{"step": 100 * i, "test": v} for i, v in enumerate(losses)]}


def test_report_from_synthetic_rows():
    low, high = 1000 * MIB, 1300 * MIB
    rows = [{"phase": "peaks", "lora+gc_peak_bytes": 900 * MIB, "lora_peak_bytes": high,
             "apollo-mini+gc_peak_bytes": 990 * MIB, "batch_size": 4, "seq_len": 128,
             "device": "cpu"},
            {"phase": "fit", "method": "lora", "budget_bytes": low, "fits": False},
            _time("lora+gc", low, [5.0, 5.2, 4.8], [30] * 3),
            _time("lora+budget", low, [4.9] * 3, [22] * 3),
            _time("lora+every-k", low, [4.95] * 3, [15] * 3, k=2),
            _time("lora+gc", high, [5.0] * 3, [30] * 3),
            _time("lora", high, [4.0] * 3, [0] * 3),
            _time("lora+budget", high, [4.1] * 3, [2] * 3)]
    curves = [_final("lora+gc", s, (5.0, 4.0, 3.0)) for s in (0, 1)]
    text = report.report(rows, curves)
    # ideal at 1000 MiB: 300 MiB over by 400/29 MiB per block -> 22 blocks; 4 + 22/30 s
    assert ("| 1000.0 | 22 | 5.00 (1.00x), 30.0 | does not fit | 4.90 (0.98x), 22.0 "
            "| 4.95 (0.99x), 15.0, k=2 | 4.73 | +3.5% |") in text  # 4.9 / 4.733 - 1
    assert ("| 1300.0 | 0 | 5.00 (1.00x), 30.0 | 4.00 (0.80x), 0.0 | 4.10 (0.82x), 2.0 | - "
            "| 4.00 | +2.5% |") in text
    # the fixed time: the shortest 200-step run, lora's at 4.0 s/step = 800 s; there
    # lora+gc is at step 160 (loss 4.0 - 0.6), lora+budget at 800 / 4.9 = step 163.3
    assert "Test loss at 800 CPU s" in text
    assert "| 1000.0 | 3.4000 | - | 3.3673 | 3.3838 |" in text
    assert "| 1300.0 | 3.4000 | 3.0000 | 3.0488 | - |" in text


def test_each_method_is_accounted_once_at_its_last_warmup_step():
    order = timing.interleaved_order(["a", "b"], rounds=1, per_turn=1, warmup=2)
    assert sorted(timing.accounted_steps(order)) == [2, 3]
    assert all(not order[i][1] for i in timing.accounted_steps(order))


def test_part_splits_the_budgets_between_processes():
    from benchmarks.frontier import cli

    assert cli.build_parser().parse_args(["--part", "2/3"]).part == (2, 3)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--part", "3/2"])
    assert doctest.testmod(cli).failed == 0


def test_predicted_ratios_follow_the_blocks_each_method_recomputed():
    """The planner's prediction of each timed row (benchmarks/frontier/predict.py):
    lora+gc is the unit, fewer recomputed blocks predict less time, every 3rd block of 30
    costs what the 10 lowest do, and the device row round-trips."""
    from ist_optim import Device

    budget = 1000 * MIB
    shape = {"model": "smollm2-135m", "batch_size": 1, "seq_len": 32, "budget_bytes": budget}

    def row(method, blocks, k=None):
        return {**shape, "method": method, "checkpointed_blocks": [blocks] * 3, "k": k}

    times = {(budget, "lora+gc"): row("lora+gc", 30), (budget, "lora"): row("lora", 0),
             (budget, "lora+budget"): row("lora+budget", 10),
             (budget, "lora+every-k"): row("lora+every-k", 10, k=3),
             (budget, "ist-sparse+budget"): row("ist-sparse+budget", 0)}
    device = Device("toy", 50e9, 10e9)
    ratios = predict.predicted_ratios(times, device)
    assert ratios[budget, "lora+gc"] == 1.0
    assert ratios[budget, "lora"] < ratios[budget, "lora+budget"] < 1.0
    assert ratios[budget, "lora+every-k"] == pytest.approx(ratios[budget, "lora+budget"],
                                                           rel=1e-2)
    assert ratios[budget, "ist-sparse+budget"] < ratios[budget, "lora"]  # 7 of 30, no GC
    rows = [{"phase": "device", "name": "toy", "threads": 1, "flops_per_second": 50e9,
             "bytes_per_second": 10e9}]
    assert predict.device_of_rows(rows) == device
    table, worst = report.prediction_table(
        {key: {**r, "cpu_seconds": [5.0 * ratios[key]] * 3} for key, r in times.items()},
        device)
    assert worst == pytest.approx(0.0, abs=1e-9) and "(+0.0%)" in table


def test_the_docs_7b_decisions_are_what_the_planner_prints():
    """docs/benchmarks.md's table of `python -m benchmarks.frontier.decisions` (two of its
    budgets rerun: a fit under the budget, and one where a BAdam block is fastest)."""
    import transformers

    from benchmarks.frontier import decisions

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the docs' figures are transformers 5's (4.x adds the attention mask)")
    assert doctest.testmod(decisions).failed == 0
    docs = (Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text()
    table = decisions.decisions("llama-2-7b", ["24GiB", "40GiB"], batch_size=8, seq_len=512,
                                device="h200")
    rows = table.splitlines()[2:]
    assert len(rows) == 2 and all(row in docs for row in rows), table
