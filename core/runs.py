"""A stored run as everything above the store sees it: its statuses, its summary and
its JSON document. The store (`headscope.storage`) builds these; the CLI and the
RPC service show them, so their shapes are defined once, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field

RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "interrupted")
FINISHED = ("succeeded", "failed", "cancelled", "interrupted")

# Bounds the front ends check at their edge (CLI options, RPC params, analysis
# params): run ids, offsets and limits fit the store's 64-bit integers, seeds are
# 32-bit as numpy and torch take them, names fit the store's name columns.
MAX_INT = 2**63 - 1
MAX_SEED = 2**32 - 1
MAX_NAME_LENGTH = 200


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
