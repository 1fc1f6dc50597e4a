"""Stored runs written straight to a store: known numbers, no model needed."""

from __future__ import annotations

from collections.abc import Iterable


def finished_run(
    store,
    model: str,
    scores: Iterable[tuple[int, int, str, float]],
    analysis: str = "head-detector",
) -> int:
    """A succeeded run with these (layer, head, metric, value) scores."""
    run_id = store.create_run(analysis, "1", model, {}, seed=0)
    store.mark_running(run_id, None, None)
    store.finish_run(run_id, scores, {})
    return run_id


def failed_run(store, model: str, error: str = "boom", analysis: str = "head-detector") -> int:
    run_id = store.create_run(analysis, "1", model, {}, seed=0)
    store.fail_run(run_id, error)
    return run_id


def grid(metric: str, layers: int, heads: int, value) -> list[tuple[int, int, str, float]]:
    """Scores of every head: `value(layer, head)`."""
    return [(l, h, metric, value(l, h)) for l in range(layers) for h in range(heads)]  # noqa: E741
