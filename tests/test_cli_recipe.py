"""ist-finetune's recipes: the measured one fills unset flags, --paper the paper's, and a
flag the user sets is never changed."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ist_optim.cli.parser import ist_kwargs_from_args, parse_args
from ist_optim.cli.recipe import DENSE_FRACTION, MEASURED_LR, WARMUP_FRACTION, apply_recipe
from ist_optim.cli.runner import DEFAULT_LR

_SET = {
    "--lr-schedule": st.sampled_from(["constant", "linear", "cosine"]),
    "--warmup-steps": st.integers(0, 50),
    "--sampling": st.sampled_from(["importance", "uniform"]),
    "--dense-steps": st.integers(0, 50),
}


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 5000), paper=st.booleans(),
       optimizer=st.sampled_from(["ist", "adamw"]),
       chosen=st.fixed_dictionaries({}, optional={k: v for k, v in _SET.items()}))
def test_user_flags_stand_and_unset_ones_follow_the_recipe(steps, paper, optimizer, chosen):
    if optimizer != "ist":
        chosen = {k: v for k, v in chosen.items() if k not in ("--sampling", "--dense-steps")}
    argv = ["--steps", str(steps), "--optimizer", optimizer, *(["--paper"] if paper else [])]
    for flag, value in chosen.items():
        argv += [flag, str(value)]
    args = parse_args(argv)
    recipe = apply_recipe(args)
    again = copy.deepcopy(args)
    apply_recipe(again)
    assert vars(again) == vars(args)  # idempotent
    for flag, value in chosen.items():  # nothing the user set is overridden
        assert getattr(args, flag[2:].replace("-", "_")) == value
    schedule = args.lr_schedule
    if "--lr-schedule" not in chosen:
        assert schedule == ("constant" if paper else "linear")
    if "--warmup-steps" not in chosen:
        expect = 0 if paper or schedule == "constant" else round(WARMUP_FRACTION * steps)
        assert args.warmup_steps == expect
    kwargs = ist_kwargs_from_args(args)
    if optimizer == "adamw":
        assert kwargs == {}
    elif paper:
        assert kwargs == {k[2:].replace("-", "_"): v for k, v in chosen.items()
                          if k in ("--sampling", "--dense-steps")}
    else:
        assert kwargs["sampling"] == chosen.get("--sampling", "uniform")
        assert kwargs["dense_steps"] == chosen.get("--dense-steps",
                                                   round(DENSE_FRACTION * steps))
    assert recipe.name == ("paper" if paper else "measured")


@pytest.mark.parametrize("peft", ["lora", "dora", "rslora", "ia3", "full"])
@pytest.mark.parametrize("optimizer", ["ist", "adamw", "badam"])
def test_rates(peft, optimizer):
    measured = apply_recipe(parse_args(["--optimizer", optimizer]))
    paper = apply_recipe(parse_args(["--paper", "--optimizer", optimizer]))
    assert paper.learning_rate(peft, optimizer, None) == DEFAULT_LR[peft]
    assert measured.learning_rate(peft, optimizer, None) == MEASURED_LR.get(
        (peft, optimizer), DEFAULT_LR[peft])
    assert measured.learning_rate(peft, optimizer, 5e-5) == 5e-5
    assert paper.learning_rate(peft, optimizer, 5e-5) == 5e-5


@pytest.mark.parametrize("extra", [["--ist-kwarg", "dense_steps=3"],
                                   ["--ist-kwarg", "ramp_steps=4"],
                                   ["--ist-kwarg", "sampling=importance"]])
def test_an_ist_kwarg_schedule_or_sampling_is_left_as_given(extra):
    args = parse_args(["--steps", "40", *extra])
    apply_recipe(args)
    kwargs = ist_kwargs_from_args(args)
    key, value = extra[1].split("=")
    assert kwargs[key] == (int(value) if value.isdigit() else value)
    if key == "ramp_steps":
        assert "dense_steps" not in kwargs  # the user's schedule, not the recipe's
    elif key == "sampling":
        assert kwargs["dense_steps"] == 20 and args.sampling is None  # --ist-kwarg's stands


def test_bad_dense_steps_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--dense-steps", "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Invalid dense_steps: -1; expected an int >= 0" in err
