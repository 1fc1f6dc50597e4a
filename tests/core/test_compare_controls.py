"""Layer-matched random head controls (`compare.layer_matched_heads`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headscope.core.compare import layer_histogram, layer_matched_heads
from headscope.core.errors import InvalidParamsError

N_LAYERS, N_HEADS = 6, 5


@st.composite
def selections(draw):
    """A head selection that leaves at least as many free heads as it has in each layer."""
    heads = set()
    for layer in range(N_LAYERS):
        count = draw(st.integers(0, N_HEADS // 2))
        heads |= {(layer, h) for h in draw(st.permutations(range(N_HEADS)))[:count]}
    return heads


@settings(max_examples=200, deadline=None)
@given(selected=selections(), seed=st.integers(0, 2**32 - 1))
def test_draws_never_contain_a_selected_head_and_match_its_layer_histogram(selected, seed):
    control = layer_matched_heads(selected, N_HEADS, np.random.default_rng(seed))
    assert not control & selected
    assert layer_histogram(control) == layer_histogram(selected)
    assert all(0 <= h < N_HEADS for _, h in control)


@settings(max_examples=100, deadline=None)
@given(
    crowded=st.integers(N_HEADS // 2 + 1, N_HEADS - 1),
    layer=st.integers(1, N_LAYERS - 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_crowded_layer_spills_to_its_nearest_neighbours_never_to_the_selection(
    crowded, layer, seed
):
    selected = {(layer, h) for h in range(crowded)}
    control = layer_matched_heads(
        selected, N_HEADS, np.random.default_rng(seed), layers=range(N_LAYERS)
    )
    assert not control & selected
    assert len(control) == len(selected)
    counts = layer_histogram(control)
    assert counts[layer] == N_HEADS - crowded  # every free head of the layer itself
    assert set(counts) <= {layer - 1, layer, layer + 1}


def test_draws_depend_on_the_generator_only():
    selected = {(0, 1), (2, 0), (2, 3)}
    first = layer_matched_heads(selected, N_HEADS, np.random.default_rng(7))
    again = layer_matched_heads(selected, N_HEADS, np.random.default_rng(7))
    assert first == again


def test_no_free_head_left_is_a_clear_error():
    everything = {(0, h) for h in range(N_HEADS)}
    with pytest.raises(InvalidParamsError, match="too few other heads"):
        layer_matched_heads(everything, N_HEADS, np.random.default_rng(0))
