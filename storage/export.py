"""Exporting a run: one JSON document, or head scores as CSV (long format)."""

from __future__ import annotations

import csv
import io
from typing import Any


def run_document(store: Any, run_id: int) -> dict[str, Any]:
    """Everything stored about a run, JSON-ready."""
    run = store.get_run(run_id)
    return {
        "run": run.as_dict(),
        "metrics": store.metrics(run_id),
        "head_scores": store.head_scores(run_id),
        "artifacts": store.artifacts(run_id),
    }


def head_scores_csv(store: Any, run_id: int) -> str:
    """run_id,layer,head,metric,value rows; values written with full precision."""
    store.get_run(run_id)  # raises for an unknown run
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run_id", "layer", "head", "metric", "value"])
    for row in store.head_scores(run_id):
        writer.writerow([run_id, row["layer"], row["head"], row["metric"], repr(row["value"])])
    return buffer.getvalue()
