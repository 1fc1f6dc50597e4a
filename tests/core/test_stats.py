"""`core.stats` against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from headscope.core import stats
from headscope.core.errors import InvalidParamsError


def test_distribution_by_hand():
    values = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]
    summary = stats.distribution(values, bins=5, thresholds=[5, 0.5])
    assert summary["count"] == 10
    assert summary["mean"] == pytest.approx(4.6)
    # sample variance: sum of squared deviations / 9
    deviations = sum((v - 4.6) ** 2 for v in values)
    assert summary["sd"] == pytest.approx(math.sqrt(deviations / 9))
    assert summary["quantiles"]["0"] == 0.0
    assert summary["quantiles"]["1"] == 10.0
    assert summary["quantiles"]["0.5"] == pytest.approx(4.5)  # between 4 and 5
    # bins of width 2 over [0, 10], the last one closed
    assert [b["count"] for b in summary["histogram"]] == [2, 2, 2, 2, 2]
    assert summary["histogram"][0]["low"] == 0.0
    assert summary["histogram"][-1]["high"] == 10.0
    assert summary["above"] == {"5": 4, "0.5": 9}  # strictly above


def test_pearson_and_spearman_by_hand():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [2.0, 1.0, 4.0, 3.0]
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-0.5, -1.5, 1.5, 0.5): products 0.75 each,
    # summing to 3; both squared sums are 5
    assert stats.pearson(a, b) == pytest.approx(3 / 5)
    assert stats.spearman(a, b) == pytest.approx(3 / 5)  # the values are their ranks
    # monotone but not linear: Spearman 1, Pearson below 1
    assert stats.spearman([1, 2, 3], [1, 10, 1000]) == pytest.approx(1.0)
    assert stats.pearson([1, 2, 3], [1, 10, 1000]) < 0.9
    # ties share their mean rank: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4)
    ranks = [1, 2.5, 2.5, 4]
    assert stats.spearman([0, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(
        stats.pearson(ranks, [1, 2, 3, 4])
    )
    assert math.isnan(stats.pearson([1, 1, 1], [1, 2, 3]))


def test_spread_by_hand():
    summary = stats.spread([0.2, 0.4, 0.9])
    assert summary["n"] == 3
    assert summary["mean"] == pytest.approx(0.5)
    # squared deviations 0.09, 0.01, 0.16: sample variance 0.26 / 2
    assert summary["sd"] == pytest.approx(math.sqrt(0.13))
    assert (summary["min"], summary["max"]) == (0.2, 0.9)
    assert stats.spread([3.0])["sd"] == 0.0


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    values = [0.0, 1.0] * 20 + [1.0] * 10  # mean 0.6
    low, high = stats.bootstrap_interval(values, seed=3)
    assert low < 0.6 < high
    # the standard error of the mean is about sqrt(0.24 / 50) = 0.069: a 95% interval
    # is about +-1.96 of it
    assert high - low == pytest.approx(2 * 1.96 * math.sqrt(0.24 / 50), rel=0.15)
    assert stats.bootstrap_interval(values, seed=3) == (low, high)
    assert stats.bootstrap_interval([0.5] * 5) == (0.5, 0.5)


def test_bad_input_is_a_clear_error():
    with pytest.raises(InvalidParamsError, match="no values"):
        stats.distribution([])
    with pytest.raises(InvalidParamsError, match="cannot be paired"):
        stats.pearson([1, 2], [1, 2, 3])
    with pytest.raises(InvalidParamsError, match="at least two"):
        stats.spearman([1], [1])
