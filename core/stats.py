"""Statistics over scores and runs: intervals, distributions, correlations, seeds.

One place for the numbers the results pages quote, so each is printed by a
command (`runs stats`, `runs compare`, `runs summarize`) or by an analysis, never
worked out by hand:

- `bootstrap_interval`: a percentile bootstrap interval of a mean (paired
  differences give the interval of a gain);
- `distribution`: counts, mean, sd, quantiles, a histogram and counts above
  thresholds of one set of values;
- `pearson` and `spearman`: correlation of two paired sets of values;
- `spread`: mean, sample sd, min and max of one metric across runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidParamsError

#: quantiles `distribution` reports
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def bootstrap_interval(
    values: Sequence[float], seed: int = 0, resamples: int = 2000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with
    replacement, `resamples` times, from a generator seeded by `seed`)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise InvalidParamsError("no values to bootstrap")
    if not 0 < level < 1:
        raise InvalidParamsError(f"interval level {level} is outside (0, 1)")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def distribution(
    values: Sequence[float], bins: int = 10, thresholds: Sequence[float] = ()
) -> dict[str, Any]:
    """Summary of one set of values: count, mean, sd (sample), quantiles, a
    histogram of `bins` equal-width bins over [min, max], and how many values lie
    above each threshold (strictly, as a threshold head selection counts them)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise InvalidParamsError("no values to summarise")
    if bins < 1:
        raise InvalidParamsError(f"bins must be at least 1, got {bins}")
    counts, edges = np.histogram(data, bins=bins)
    return {
        "count": int(data.size),
        "mean": float(data.mean()),
        "sd": float(data.std(ddof=1)) if data.size > 1 else 0.0,
        "quantiles": {f"{q:g}": float(np.quantile(data, q)) for q in QUANTILES},
        "histogram": [
            {"low": float(edges[i]), "high": float(edges[i + 1]), "count": int(counts[i])}
            for i in range(bins)
        ],
        "above": {f"{t:g}": int((data > t).sum()) for t in thresholds},
    }


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of paired values (nan when either side is constant)."""
    x, y = _paired(a, b)
    x, y = x - x.mean(), y - y.mean()
    norm = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum()) / norm if norm > 0 else float("nan")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson of the ranks, ties sharing their mean rank."""
    x, y = _paired(a, b)
    return pearson(_ranks(x), _ranks(y))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample sd (0 for one value), min and max of one metric across runs."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise InvalidParamsError("no values to summarise")
    return {
        "n": int(data.size),
        "mean": float(data.mean()),
        "sd": float(data.std(ddof=1)) if data.size > 1 else 0.0,
        "min": float(data.min()),
        "max": float(data.max()),
    }


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise InvalidParamsError(f"{x.size} and {y.size} values cannot be paired")
    if x.size < 2:
        raise InvalidParamsError("a correlation needs at least two paired values")
    return x, y


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(1, values.size + 1)
    for value in np.unique(values):  # ties share their mean rank
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks
