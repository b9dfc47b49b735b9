"""ist-finetune plan: the golden table for LLaMA-2-7B at batch 8 x 512, --json, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ist_optim import ISTConfig
from ist_optim.cli import CLIError, main
from ist_optim.cli.plan import PLAN_ROWS, parse_budget
from ist_optim.config import BYTE_UNITS

# `ist-finetune plan --model llama-2-7b --batch-size 8 --seq-len 512 --budget 24GiB`
# (the H200 anchors of shared/bench/README.md for comparison: LoRA all 44.5 GiB, LoRA all
# + GC 16.0, full AdamW 62.3, full AdamW8bit 50.0; the QLoRA, GaLore and APOLLO rows are
# checked against accounted CPU steps only, tests/test_qlora.py, test_memory_estimate.py;
# the step-time column against the H200 step times: tests/test_steptime.py)
GOLDEN = (Path(__file__).parent / "data" / "plan_llama2_7b.txt").read_text()


def test_golden_table_llama2_7b(capsys):
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("the golden figures are transformers 5's; 4.x passes each block a "
                    "batch x 1 x seq x seq attention mask (+0.1 GiB here), which the "
                    "planner models and test_qlora's accounted 4.x steps check")
    argv = ["plan", "--model", "llama-2-7b", "--batch-size", "8", "--seq-len", "512",
            "--budget", "24GiB"]
    assert main(argv) == 0
    assert capsys.readouterr().out == GOLDEN


def test_json_rows_and_budget(capsys):
    argv = ["plan", "--model", "smollm2-135m", "--batch-size", "2", "--seq-len", "64",
            "--budget", "300MiB", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert [r["configuration"] for r in rows] == list(PLAN_ROWS)
    assert result["budget_bytes"] == 300 * 2**20
    assert all(r["fits"] == (r["peak_bytes"] <= 300 * 2**20) for r in rows)
    by_name = {r["configuration"]: r for r in rows}
    assert by_name["LoRA all + GC"]["peak_bytes"] < by_name["LoRA all"]["peak_bytes"]
    assert by_name["LoRA all + GC"]["flops_per_step"] > by_name["LoRA all"]["flops_per_step"]


def test_model_from_a_config_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                "intermediate_size": 128, "num_hidden_layers": 4,
                                "num_attention_heads": 4, "vocab_size": 256}))
    assert main(["plan", "--model", str(path), "--batch-size", "2", "--seq-len", "16",
                 "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "fastest configuration that fits" in out and "4 layers" in out


@pytest.mark.parametrize("value, share", [("1", "1 of 30 layers"), ("1.0", "30 of 30 layers"),
                                          ("0.25", "7 of 30 layers"), ("3", "3 of 30 layers")])
def test_active_layers_count_as_the_sampler_counts_them(value, share, capsys):
    """``--active-layers`` means what it means to ``ist-finetune`` and ``ISTOptimizer``
    (``resolve_count``): an int a count, a float a fraction, so ``1.0`` is every layer."""
    assert main(["plan", "--model", "smollm2-135m", "--active-layers", value]) == 0
    assert share in capsys.readouterr().out


@pytest.mark.parametrize("argv,fragment", [
    (["--model", "gpt-9"], "unknown model 'gpt-9'"),
    (["--model", "llama-2-7b", "--budget", "lots"], "Invalid --budget: 'lots'; expected a number"),
    (["--model", "llama-2-7b", "--budget", "24"],
     "Invalid --budget: '24' has no unit; write '24GiB'"),
    (["--model", "llama-2-7b", "--budget", "24G"], "'G' is ambiguous: write '24GiB'"),
    (["--model", "smollm2-135m", "--target-modules", "q_proj,nope"], "name no linear layer"),
    (["--model", "smollm2-135m", "--active-layers", "99"], "99 is outside [1, 30]"),
    (["--model", "smollm2-135m", "--active-layers", "2.5"], "2.5 is not a fraction in (0, 1]"),
])
def test_errors_are_one_line(argv, fragment, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and err.startswith("ist-finetune")


def test_usage_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "llama-2-7b", "--batch-size", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "expected an integer >= 1" in err and "\n" not in err


@given(st.integers(1, 10**6), st.sampled_from(sorted(BYTE_UNITS)), st.sampled_from(["", " "]))
def test_parse_budget_units(value, unit, space):
    assert parse_budget(f"{value}{space}{unit}") == value * BYTE_UNITS[unit]


@pytest.mark.parametrize("text", ["", "-1GiB", "0GiB", "24 parsecs", "GiB", "24", "24gib", "8G"])
def test_parse_budget_rejects(text):
    with pytest.raises(CLIError, match=f"Invalid --budget: {text!r}"):
        parse_budget(text)


_SIZES = st.one_of(
    st.text(alphabet="0123456789.", min_size=1, max_size=6),  # bare numbers, malformed ones
    st.builds("{}{}{}".format, st.integers(0, 5000), st.sampled_from(["", " "]),
              st.sampled_from([*BYTE_UNITS, "gib", "G", "g", "M", "k", "Gb", "bytes", ""])),
    st.text(max_size=8))


@given(_SIZES)
@example("--budget")  # a text holding the flag's name (found by hypothesis on torch 2.11)
def test_budget_flag_and_memory_budget_read_a_size_alike(text):
    """Issue 33: `plan --budget X` and `ISTConfig(memory_budget=X)` (and the YAML key) read
    a size by one rule: both give the same bytes, or both refuse with the same reason."""
    try:
        flag = parse_budget(text)
    except CLIError as err:
        flag = str(err).replace("--budget", "memory_budget", 1)  # the name, not the text
    try:
        option = ISTConfig(memory_budget=text).memory_budget_bytes
    except ValueError as err:
        option = str(err)
    assert flag == option


def test_llama3_8b_at_24gib_lists_the_alternatives_and_names_the_fastest(capsys):
    """Issue 24: QLoRA, QLoRA + IST, GaLore, APOLLO (and their layer-wise variants) and the
    memory_budget rows beside the others, and "fastest that fits" names the QLoRA + IST
    budget row when it wins."""
    argv = ["plan", "--model", "llama-3-8b", "--budget", "24GiB", "--json"]
    assert main(argv) == 0
    rows = {r["configuration"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert list(rows) == list(PLAN_ROWS)
    for name in ("QLoRA + GC", "QLoRA + IST + GC + cut", "QLoRA + IST, budget",
                 "LoRA all, budget", "IST depth-aware, budget"):
        assert rows[name]["fits"], name
    for name in ("GaLore + GC", "APOLLO + GC", "APOLLO-Mini + GC", "GaLore layer-wise + GC",
                 "APOLLO-Mini layer-wise + GC", "full AdamW"):
        assert not rows[name]["fits"], name  # 8B weights, full-rank gradients, 128k vocab
    assert rows["QLoRA + GC"]["peak_bytes"] < rows["LoRA all + GC"]["peak_bytes"]
    assert rows["APOLLO-Mini + GC"]["peak_bytes"] < rows["GaLore + GC"]["peak_bytes"] \
        < rows["full AdamW"]["peak_bytes"]
    # layer-wise: no gradient outlives its parameter's update
    assert rows["GaLore layer-wise + GC"]["peak_bytes"] < rows["GaLore + GC"]["peak_bytes"]
    budgeted = rows["IST depth-aware, budget"]
    assert budgeted["flops_per_step"] < rows["IST + GC + cut"]["flops_per_step"]
    assert budgeted["peak_bytes"] <= 24 * 2**30
    main(["plan", "--model", "llama-3-8b", "--budget", "24GiB"])
    out = capsys.readouterr().out
    assert "fastest configuration that fits: QLoRA + IST, budget" in out
    assert "fastest that trains every layer each step: LoRA all, budget" in out
    assert budgeted["predicted_step_seconds"] < rows["IST + GC + cut"]["predicted_step_seconds"]
    assert rows["LoRA all, budget"]["predicted_step_seconds"] \
        <= rows["LoRA all + GC"]["predicted_step_seconds"]
