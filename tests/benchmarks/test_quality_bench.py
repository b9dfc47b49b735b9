"""benchmarks/quality.py: method specs from the command line and the equal-time report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.quality import heldout as quality


def test_parse_method_adds_ist_kwargs_and_lr():
    m = quality.parse_method('lora+ist-n=lora:ist:{"estimator": "normalized", "lr": 0.002}')
    assert (m.name, m.peft, m.optimizer) == ("lora+ist-n", "lora", "ist")
    assert m.ist_kwargs == {"estimator": "normalized"} and m.learning_rate == 0.002
    assert quality.parse_method("d=dora:adamw").ist_kwargs == {}
    with pytest.raises(Exception, match="NAME=PEFT:OPTIMIZER"):
        quality.parse_method("nocolon")


def _run(method, seed, evals, cpu_total, wall_total):
    return {"method": method, "seed": seed, "steps": evals[-1][0], "evals": evals,
            "val_loss_before": evals[0][2], "val_loss_after": evals[-1][2],
            "train_cpu_seconds": cpu_total, "train_seconds": wall_total,
            "cpu_seconds_per_step": 1.0, "seconds_per_step": 1.0,
            "optimizer_state_bytes": 2**20, "peak_bytes": 2**30, "memory_kind": "peak RSS"}


def test_report_equal_time_uses_the_fastest_methods_budget():
    # fast: 10 CPU s for 20 steps; slow: 10 CPU s reach only step 10.
    fast = _run("fast", 0, [[0, 0, 5.0, 0], [10, 9, 4.5, 5], [20, 18, 4.0, 10]], 10, 18)
    slow = _run("slow", 0, [[0, 0, 5.0, 0], [10, 4, 4.2, 10], [20, 8, 3.9, 20]], 20, 8)
    cpu = quality.report([fast, slow], "cpu")
    rows = {line.split("|")[1].strip(): line.split("|") for line in cpu.splitlines()
            if line.startswith("| fast") or line.startswith("| slow")}
    assert rows["fast"][5].strip() == "4.0000" and rows["fast"][6].strip() == "20"
    assert rows["slow"][5].strip() == "4.2000" and rows["slow"][6].strip() == "10"
    assert rows["slow"][4].strip() == "3.9000"  # equal steps
    wall = quality.report([fast, slow], "wall")  # by wall time the slow one is the fast one
    rows = {line.split("|")[1].strip(): line.split("|") for line in wall.splitlines()
            if line.startswith("| fast") or line.startswith("| slow")}
    assert rows["fast"][5].strip() == "5.0000" and rows["slow"][5].strip() == "3.9000"


def test_mean_range_ignores_nan():
    assert quality.mean_range([1.0, 3.0]) == "2.0000 (1.0000-3.0000)"
    assert quality.mean_range([math.nan]) == "n/a"


RESULTS = Path(quality.__file__).resolve().parents[1] / "results" / "quality"


def test_report_refuses_runs_evaluated_at_other_steps_and_groups_them_when_told(capsys):
    """The runs of ``eval-every-10/`` are those of the main table evaluated every 10 steps
    (the same losses at 10, 20, 30): in one table each (method, seed) would count twice."""
    files = [str(p) for p in sorted(RESULTS.glob("quality-seed*.jsonl"))
             + sorted((RESULTS / "eval-every-10").glob("quality-seed*.jsonl"))]
    assert quality.main(["--report", *files]) == 2
    err = capsys.readouterr().err
    assert "the rows mix protocols: eval_steps (0, 5, 10, 15, 20, 25, 30) / (0, 10, 20, 30)" in (
        err) and "--group-by eval_steps" in err
    assert quality.main(["--report", *files, "--group-by", "eval_steps"]) == 0
    out = capsys.readouterr().out
    assert out.count("## eval_steps") == 2 and "| badam-lr3e-4 | 2 |" in out
    assert quality.main(["--report", *files[:2], *files[:1]]) == 2
    assert "the run ('lora', 0) is in the rows twice" in capsys.readouterr().err


def test_the_per_step_table_is_the_mean_over_seeds():
    a = _run("a", 0, [[0, 0, 5.0, 0], [10, 1, 4.0, 1]], 1, 1)
    b = _run("a", 1, [[0, 0, 5.0, 0], [10, 1, 3.0, 1]], 1, 1)
    assert quality.report([a, b]).endswith(
        "| step | a |\n| --- | --- |\n| 0 | 5.0000 |\n| 10 | 3.5000 |\n")
