"""ISTConfig: every option validated once, with a one-line error naming value and fix."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import lora_model
from hypothesis import given
from hypothesis import strategies as st

from ist_optim import ISTConfig, ISTOptimizer
from ist_optim.config import BYTE_UNITS, parse_bytes

BAD = [
    (dict(active_layers=0), ValueError, "active_layers"),
    (dict(active_layers=1.5), ValueError, "active_layers=1.5"),
    (dict(active_layers=True), TypeError, "active_layers"),
    (dict(num_candidates=1), ValueError, "num_candidates: 1"),
    (dict(score_lr=-1.0), ValueError, "score_lr: -1.0"),
    (dict(score_lr=math.inf), ValueError, "score_lr: inf"),
    (dict(suppression=1.0), ValueError, "suppression: 1.0"),
    (dict(update_interval=0), ValueError, "update_interval: 0"),
    (dict(sampling="random"), ValueError, "sampling: 'random'"),
    (dict(estimator="exact"), ValueError, "estimator: 'exact'"),
    (dict(sampling="uniform", estimator="normalized"), ValueError, "no effect"),
    (dict(suppression_mode="lora"), ValueError, "suppression_mode: 'lora'"),
    (dict(freeze_inactive=1), TypeError, "freeze_inactive"),
    (dict(state_policy="gpu"), ValueError, "state_policy: 'gpu'"),
    (dict(skip_backward="yes"), TypeError, "skip_backward"),
    (dict(skip_backward=True, freeze_inactive=False), ValueError, "needs freeze_inactive"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(advantage_scale=-0.1), ValueError, "advantage_scale"),
    (dict(score_retention=1.5), ValueError, "score_retention: 1.5"),
    (dict(scale_decay=1.0), ValueError, "scale_decay: 1.0"),
    (dict(depth_window=0), ValueError, "depth_window: 0"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_option_raises_one_line_error(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        ISTConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_optimizer_refuses_it_before_touching_the_model(kwargs, error, match):
    model = lora_model(4)
    hooks = len(model._forward_pre_hooks)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=match):
        ISTOptimizer(torch.optim.AdamW, model, lr=1e-3, **kwargs)
    assert len(model._forward_pre_hooks) == hooks
    assert [p.requires_grad for p in model.parameters()] == flags


def test_estimator_constants_reach_the_update():
    from conftest import lm_batch

    def scores(**kwargs):
        model = lora_model(4)
        opt = ISTOptimizer(torch.optim.SGD, model, lr=1e-3, seed=0, update_interval=1,
                           estimator="normalized", **kwargs)
        model(**lm_batch()).loss.backward()
        opt.step()
        return opt.scores

    base = scores()
    assert torch.allclose(scores(advantage_scale=0.2), 2 * base)
    assert opt_config_defaults_match()


def opt_config_defaults_match() -> bool:
    opt = ISTOptimizer(torch.optim.SGD, lora_model(4), lr=1e-3)
    return opt.config == ISTConfig()


@pytest.mark.parametrize("name", ["score_lr", "suppression", "score_retention"])
def test_nan_option_is_a_value_error_naming_the_range(name):
    with pytest.raises(ValueError, match=rf"Invalid {name}: nan; expected a number in"):
        ISTOptimizer(torch.optim.SGD, lora_model(4), lr=1e-3, **{name: float("nan")})


# ------------------------------------------------------------------ sizes: one rule (issue 33)
@given(st.integers(1, 2**50))
def test_an_int_is_bytes(n):
    assert parse_bytes(n) == n == ISTConfig(memory_budget=n).memory_budget_bytes


@given(st.integers(0, 10**6), st.sampled_from(sorted(BYTE_UNITS)), st.sampled_from(["", " "]),
       st.integers(0, 999))
def test_a_string_is_a_number_and_a_unit_read_exactly(number, unit, space, thousandths):
    size = number * BYTE_UNITS[unit]
    if size >= 1:
        assert parse_bytes(f"{number}{space}{unit}") == size
    exact = (number * 1000 + thousandths) * BYTE_UNITS[unit] // 1000
    if exact >= 1:
        assert parse_bytes(f" {number}.{thousandths:03d}{space}{unit} ") == exact


@given(st.from_regex(r"\d{1,6}(\.\d{1,3})?", fullmatch=True))
def test_a_string_without_a_unit_is_refused_with_the_fix(text):
    """`"24"` is not guessed (bytes here, GiB in the old `plan --budget`): one line naming
    the value and what to write."""
    with pytest.raises(ValueError) as info:
        parse_bytes(text, "memory_budget")
    message = str(info.value)
    assert message.startswith(f"Invalid memory_budget: {text!r} has no unit; write "
                              f"'{text}GiB'") and "\n" not in message


@given(st.integers(1, 999), st.sampled_from(sorted(BYTE_UNITS)).flatmap(
    lambda unit: st.sampled_from([unit.lower(), unit.upper(), unit.swapcase()]).filter(
        lambda spelled: spelled != unit).map(lambda spelled: (unit, spelled))))
def test_a_unit_in_another_case_is_refused_with_its_spelling(number, units):
    unit, spelled = units
    with pytest.raises(ValueError, match=f"units are case-sensitive: write '{number}{unit}'"):
        parse_bytes(f"{number}{spelled}")


@pytest.mark.parametrize(("text", "fix"), [
    ("24G", "'G' is ambiguous: write '24GiB' (binary) or '24GB' (decimal)"),
    ("8k", "'k' is ambiguous: write '8KiB' (binary) or '8kB' (decimal)"),
    ("3 parsecs", "unknown unit 'parsecs'; use one of B, kB, MB"),
    ("0GiB", "expected a size of at least 1 byte"),
    ("0.1B", "expected a size of at least 1 byte"),
    ("-1GiB", "expected a number and a unit like '24GiB'"),
])
def test_a_surprising_size_names_the_value_and_the_fix(text, fix):
    with pytest.raises(ValueError, match=re.escape(f"Invalid --budget: {text!r}")) as info:
        parse_bytes(text, "--budget")
    assert fix in str(info.value) and "\n" not in str(info.value)


@given(st.text(max_size=10))
def test_any_text_is_a_size_or_a_one_line_error_naming_it(text):
    try:
        value = parse_bytes(text)
    except ValueError as err:
        assert "\n" not in str(err) and repr(text) in str(err)
    else:
        assert isinstance(value, int) and value >= 1


@pytest.mark.parametrize("bad", [True, 1.5e9, None, b"1GiB"])
def test_a_size_of_another_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="must be an int \\(bytes\\) or a string with a unit"):
        parse_bytes(bad)
