"""A stored run as everything above the store sees it: its statuses, its summary,
its JSON document, and the findings query across runs. The store
(`headscope.storage`) builds these; the CLI and the RPC service show them, so their
shapes and rules are defined once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidParamsError, RunFailedError, RunNotFinishedError

RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")

# Bounds the front ends check at their edge (CLI options, RPC params, analysis
# params): run ids, offsets and limits fit the store's 64-bit integers, seeds are
# 32-bit as numpy and torch take them, names fit the store's name columns.
MAX_INT = 2**63 - 1
MAX_SEED = 2**32 - 1
MAX_NAME_LENGTH = 200
#: names (models, analyses, metrics) as the store keeps them
Name = Annotated[str, Field(max_length=MAX_NAME_LENGTH)]
#: run ids, offsets: the store's 64-bit integers
StoredInt = Annotated[int, Field(le=MAX_INT)]


@dataclass
class RunSummary:
    """A run as callers see it (no ORM objects leak out of the store).

    `as_dict()` is its JSON form (times as ISO 8601 strings, UTC); the RPC result
    schemas are generated from this class.
    """

    id: int
    analysis: str
    analysis_version: str
    plugin: str | None
    model: str
    model_revision: str | None
    params: dict[str, Any]
    seed: int
    status: Annotated[
        str, Field(description="queued, running, succeeded, failed, cancelled or interrupted.")
    ]
    error: str | None
    created_at: Annotated[datetime | None, Field(description="ISO 8601, UTC.")]
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None
    progress_done: float | None
    progress_total: float | None
    progress_message: str | None
    packages: dict[str, Any]
    summary: dict[str, Any] | None
    submitted_by: Annotated[
        str | None, Field(description="Name of the API token that submitted it, if any.")
    ] = None

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        for key in ("created_at", "started_at", "finished_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


def run_document(store: Any, run_id: int) -> dict[str, Any]:
    """Everything stored about a run, JSON-ready: `runs show --format json`,
    `runs export` and `runs.get` all answer with it."""
    run = store.get_run(run_id)
    return {
        "run": run.as_dict(),
        "metrics": store.metrics(run_id),
        "head_scores": store.head_scores(run_id),
        "artifacts": store.artifacts(run_id),
    }


def require_succeeded(store: Any, run_id: int) -> RunSummary:
    """The run, if it has results; otherwise why not (still working, or ended without)."""
    run = store.get_run(run_id)
    if run.status in ("queued", "running"):
        raise RunNotFinishedError(f"run {run_id} is {run.status}", run_id, run.status)
    if run.status != "succeeded":
        raise RunFailedError(
            f"run {run_id} has no results: it {run.status}"
            + (f" ({run.error})" if run.error else ""),
            run_id,
            run.status,
            run.error,
        )
    return run


def model_name(registry: Any, name: str | None) -> str | None:
    """The stored name of a model: registered aliases mean their model
    (`smollm2` -> `smollm2-135m`); other names are taken as they are."""
    if not name:
        return None
    spec = registry.models.get(name)
    return spec.name if spec is not None else name


class FindingsQuery(BaseModel):
    """Top heads by a metric across succeeded runs: the params of `findings.query`
    and the options of `headscope findings top`, checked by the same rules."""

    model_config = ConfigDict(extra="forbid", strict=True)

    metric: Name | None = Field(
        None, description="Head metric; default: the primary metric of the run's or analysis's."
    )
    run_id: StoredInt | None = Field(
        None, ge=1, description="Only this run (it must have succeeded)."
    )
    model: Name | None = Field(None, description="Only runs on this model.")
    analysis: Name | None = Field(None, description="Only runs of this analysis.")
    min_value: float | None = Field(None, description="Only heads scoring at least this.")
    order: Literal["desc", "asc"] = Field("desc", description="Highest scores first, or lowest.")
    limit: int = Field(20, ge=1, le=1000, description="Heads per page.")
    offset: StoredInt = Field(0, ge=0, description="Heads to skip.")


def query_findings(store: Any, registry: Any, query: FindingsQuery) -> dict[str, Any]:
    """One page of a findings query: `{metric, limit, offset, next_offset, heads}`,
    `next_offset` None on the last page. Ties are ordered by run, layer and head."""
    analysis = query.analysis
    if query.run_id is not None:
        analysis = analysis or require_succeeded(store, query.run_id).analysis
    metric = registry.head_metric(analysis, query.metric)
    if metric is None:
        raise InvalidParamsError(
            "no metric given, and no run or analysis whose primary metric it could default to",
            [{"field": "metric", "message": "Field required"}],
        )
    heads = store.top_heads(
        metric,
        run_id=query.run_id,
        model=model_name(registry, query.model),
        analysis=query.analysis,
        limit=query.limit,
        offset=query.offset,
        min_value=query.min_value,
        descending=query.order == "desc",
    )
    full_page = len(heads) == query.limit
    return {
        "metric": metric,
        "limit": query.limit,
        "offset": query.offset,
        "next_offset": query.offset + len(heads) if full_page else None,
        "heads": heads,
    }


class HeadQuery(BaseModel):
    """One head across succeeded runs: the params of `findings.head` and the
    arguments of `headscope runs head`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    layer: StoredInt = Field(ge=0, description="Layer of the head (from 0).")
    head: StoredInt = Field(ge=0, description="Head within the layer (from 0).")
    model: Name | None = Field(None, description="Only runs on this model.")
    analysis: Name | None = Field(None, description="Only runs of this analysis.")


def head_across_runs(store: Any, registry: Any, query: HeadQuery) -> dict[str, Any]:
    """Every succeeded run's scores for one head, newest run first:
    `{layer, head, runs: [{run_id, analysis, model, primary_metric, scores, rank,
    heads}]}`; `rank` is the head's place among the run's `heads` by its primary
    metric (1: the highest), None where it has no score for it."""
    rows = store.head_across_runs(
        query.layer, query.head, model_name(registry, query.model), query.analysis
    )
    runs: dict[int, dict[str, Any]] = {}
    for row in rows:
        entry = runs.setdefault(
            row["run_id"],
            {
                "run_id": row["run_id"],
                "analysis": row["analysis"],
                "model": row["model"],
                "primary_metric": registry.head_metric(row["analysis"]),
                "scores": {},
            },
        )
        entry["scores"][row["metric"]] = row["value"]
    for entry in runs.values():
        metric = entry["primary_metric"]
        place = (
            store.head_rank(entry["run_id"], metric, query.layer, query.head) if metric else None
        )
        entry["rank"], entry["heads"] = place or (None, None)
    return {"layer": query.layer, "head": query.head, "runs": list(runs.values())}
