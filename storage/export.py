"""Exporting a run's head scores as CSV (long format); the JSON document is
`headscope.core.runs.run_document`."""

from __future__ import annotations

import csv
import io
from typing import Any


def head_scores_csv(store: Any, run_id: int) -> str:
    """run_id,layer,head,metric,value rows; values written with full precision."""
    store.get_run(run_id)  # raises for an unknown run
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run_id", "layer", "head", "metric", "value"])
    for row in store.head_scores(run_id):
        writer.writerow([run_id, row["layer"], row["head"], row["metric"], repr(row["value"])])
    return buffer.getvalue()
