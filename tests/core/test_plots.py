"""Heatmaps outline only heads that really rank at the top."""

from __future__ import annotations

import numpy as np
import pytest

from headscope.core.plots import head_heatmap, top_cells


def test_distinct_scores_outline_the_k_best():
    scores = np.arange(12.0).reshape(3, 4)
    assert top_cells(scores, 3) == [(2, 3), (2, 2), (2, 1)]


@pytest.mark.parametrize(
    "scores",
    [np.zeros((3, 4)), np.full((2, 2), np.nan), np.ones((2, 3))],
)
def test_flat_or_empty_maps_outline_nothing(scores):
    assert top_cells(scores, 5) == []


def test_ties_at_the_cut_are_left_out_and_nans_ignored():
    scores = np.array([[5.0, 3.0, 3.0], [np.nan, 1.0, 0.0]])
    assert top_cells(scores, 2) == [(0, 0)]  # the two 3.0s tie for second place
    assert top_cells(scores, 3) == [(0, 0), (0, 1), (0, 2)]


def test_the_outline_has_a_legend(tmp_path):
    figure = head_heatmap(np.arange(12.0).reshape(3, 4), "scores", annotate_top=2)
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["top 2 heads"]
    assert head_heatmap(np.zeros((3, 4)), "flat").axes[0].get_legend() is None
