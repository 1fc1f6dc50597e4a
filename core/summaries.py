"""Numbers about stored runs, printed by `runs stats`, `runs compare` and `runs summarize`.

- `head_score_stats`: the distribution of one head metric of a run (counts,
  quantiles, histogram, heads above thresholds);
- (`runs compare`'s score correlation is `compare.score_correlation`);
- `summarize_runs`: each metric's mean, sd and spread across runs of one analysis
  on one model (e.g. seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import stats
from .errors import InvalidParamsError


def _finished(store: Any, run_id: int):
    run = store.get_run(run_id)
    if run.status != "succeeded":
        raise InvalidParamsError(f"run {run_id} has status {run.status}; it has no results")
    return run


def head_score_stats(
    store: Any,
    registry: Any,
    run_id: int,
    metric: str | None = None,
    bins: int = 10,
    thresholds: Sequence[float] = (),
) -> dict[str, Any]:
    """Distribution of head metric `metric` (default: the analysis's primary one)."""
    run = _finished(store, run_id)
    available = store.head_metrics(run_id)
    if not available:
        raise InvalidParamsError(f"run {run_id} ({run.analysis}) has no per-head scores")
    chosen = registry.head_metric(run.analysis, metric, available)
    if chosen not in available:
        raise InvalidParamsError(
            f"run {run_id} has no head metric {chosen!r}; it has: {', '.join(available)}"
        )
    values = [r["value"] for r in store.head_scores(run_id, chosen)]
    return {
        "run_id": run_id,
        "analysis": run.analysis,
        "model": run.model,
        "metric": chosen,
        **stats.distribution(values, bins, thresholds),
    }


def summarize_runs(store: Any, run_ids: Sequence[int]) -> dict[str, Any]:
    """Mean, sample sd, min and max of every metric the runs share, across the runs.

    The runs must be of one analysis on one model; params that differ between them
    (other than the seed) are listed, since they may explain the spread."""
    if len(set(run_ids)) != len(run_ids):
        raise InvalidParamsError("a run is named twice")
    if len(run_ids) < 2:
        raise InvalidParamsError("summarize needs at least two runs")
    runs = [_finished(store, run_id) for run_id in run_ids]
    kinds = {(r.analysis, r.model) for r in runs}
    if len(kinds) > 1:
        named = ", ".join(f"run {r.id}: {r.analysis} on {r.model}" for r in runs)
        raise InvalidParamsError(f"runs of different analyses or models do not summarize ({named})")
    metrics = [store.metrics(r.id) for r in runs]
    shared = [name for name in metrics[0] if all(name in m for m in metrics[1:])]
    keys = sorted({k for r in runs for k in r.params})
    differing = [k for k in keys if len({repr(r.params.get(k)) for r in runs}) > 1]
    return {
        "analysis": runs[0].analysis,
        "model": runs[0].model,
        "runs": [r.id for r in runs],
        "seeds": [r.seed for r in runs],
        "differing_params": differing,
        "metrics": {name: stats.spread([m[name] for m in metrics]) for name in shared},
    }
