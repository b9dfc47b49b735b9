"""GaLore / APOLLO state and step buffers (ist_optim/planner/projection.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ist_optim.planner.projection import PROJECTED_OPTIMIZERS, ProjectionSpec, projected_step


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kind": "adam", "rank": 4}, "kind must be 'galore' or 'apollo'"),
    ({"kind": "galore", "rank": 0}, "rank must be an integer >= 1"),
    ({"kind": "galore", "rank": True}, "rank must be an integer >= 1"),
    ({"kind": "apollo", "rank": 4, "scale_type": "row"}, "scale_type must be"),
])
def test_a_bad_spec_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProjectionSpec(**kwargs)


def test_every_named_optimizer_is_a_valid_spec():
    for name, fields in PROJECTED_OPTIMIZERS.items():
        spec = ProjectionSpec(**fields)  # type: ignore[arg-type]
        assert spec.layerwise == name.endswith("-layerwise")


@given(st.integers(1, 512), st.integers(1, 512), st.sampled_from([2, 4]))
def test_untargeted_parameters_keep_plain_adam_state(m, n, element):
    spec = ProjectionSpec("galore", rank=8)
    state, peak = projected_step([(m, n)], [False], element, spec, update=False)
    assert state == 2 * m * n * element  # exp_avg and exp_avg_sq
    assert peak >= m * n * element  # at least one full-size temporary


@pytest.mark.parametrize("kind", ["galore", "apollo"])
def test_projected_state_is_smaller_than_adams_for_a_low_rank(kind):
    spec = ProjectionSpec(kind, rank=4)
    projected, _ = projected_step([(256, 128)], [True], 2, spec, update=False)
    plain, _ = projected_step([(256, 128)], [False], 2, spec, update=False)
    assert projected < plain


def test_galore_moments_are_rank_sized_and_a_projector_is_kept():
    state, _ = projected_step([(64, 32)], [True], 2, ProjectionSpec("galore", 4), False)
    assert state == 2 * (2 * 64 * 4) + 2 * 4 * 32  # two m x r moments, an r x n projector


@pytest.mark.parametrize("kind", ["galore", "apollo"])
@pytest.mark.parametrize("element", [2, 4])
def test_a_projector_update_keeps_the_state_and_never_needs_less(kind, element):
    spec = ProjectionSpec(kind, rank=4)
    state, plain = projected_step([(256, 1024)], [True], element, spec, update=False)
    updated, updating = projected_step([(256, 1024)], [True], element, spec, update=True)
    assert updated == state and updating >= plain


def test_galore_in_16_bits_runs_its_svd_in_float32_on_an_update():
    spec = ProjectionSpec("galore", rank=4)
    _, plain = projected_step([(64, 32)], [True], 2, spec, update=False)
    _, updating = projected_step([(64, 32)], [True], 2, spec, update=True)
    assert updating > plain  # the float32 copy of the gradient and the SVD's factors


def test_a_projected_target_must_be_a_matrix():
    with pytest.raises(ValueError, match="must be a matrix"):
        projected_step([(4, 4, 4)], [True], 2, ProjectionSpec("apollo", 2), False)
