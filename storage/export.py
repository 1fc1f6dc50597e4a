"""Exporting a run's head scores: CSV in long format (a row per score), wide CSV (a
layers x heads matrix per metric) and Parquet (long format); the JSON document is
`headscope.core.runs.run_document`."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..core.errors import HeadscopeError, InvalidParamsError

LONG_COLUMNS = ("run_id", "layer", "head", "metric", "value")
PARQUET_MISSING = "Parquet export needs pyarrow: pip install 'headscope[parquet]'"


def head_scores_csv(store: Any, run_id: int, metric: str | None = None) -> str:
    """run_id,layer,head,metric,value rows; values written with full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LONG_COLUMNS)
    for row in _scores(store, run_id, metric):
        writer.writerow([run_id, row["layer"], row["head"], row["metric"], repr(row["value"])])
    return buffer.getvalue()


def head_scores_wide_csv(store: Any, run_id: int, metric: str | None = None) -> str:
    """One layers x heads matrix per metric, stacked: `metric,layer,head_0,head_1,...`
    with a row per layer (every layer up to the metric's last), so one CSV reader
    reads them all. A head a metric does not score (e.g. one scored per KV head) is
    an empty cell."""
    grids: dict[str, dict[tuple[int, int], float]] = {}
    for row in _scores(store, run_id, metric):
        grids.setdefault(row["metric"], {})[row["layer"], row["head"]] = row["value"]
    heads = 1 + max((h for grid in grids.values() for _, h in grid), default=-1)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "layer", *(f"head_{h}" for h in range(heads))])
    for name, grid in grids.items():
        for layer in range(1 + max(layer for layer, _ in grid)):
            cells = [grid.get((layer, h)) for h in range(heads)]
            writer.writerow([name, layer, *("" if v is None else repr(v) for v in cells)])
    return buffer.getvalue()


def write_head_scores_parquet(
    store: Any, run_id: int, path: Path, metric: str | None = None
) -> int:
    """The long-format rows as a Parquet file; returns how many rows it holds."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise HeadscopeError(PARQUET_MISSING) from None
    rows = _scores(store, run_id, metric)
    schema = pa.schema(
        [
            ("run_id", pa.int64()),
            ("layer", pa.int64()),
            ("head", pa.int64()),
            ("metric", pa.string()),
            ("value", pa.float64()),
        ]
    )
    columns = {
        "run_id": [run_id] * len(rows),
        **{name: [row[name] for row in rows] for name in LONG_COLUMNS[1:]},
    }
    pq.write_table(pa.table(columns, schema=schema), path)
    return len(rows)


def _scores(store: Any, run_id: int, metric: str | None) -> list[dict[str, Any]]:
    """The run's head scores (of one metric when given, which the run must have)."""
    store.get_run(run_id)  # raises for an unknown run
    if metric is not None:
        available = store.head_metrics(run_id)
        if metric not in available:
            raise InvalidParamsError(
                f"run {run_id} has no head metric {metric!r}; it has: "
                + (", ".join(available) or "none")
            )
    return store.head_scores(run_id, metric)


def stored_artifact(store: Any, run_id: int, analysis: str, name: str) -> bytes:
    """The bytes of artifact `name` of a run of `analysis` (e.g. a kv-cache-plan run's
    kv_plan.tsv), with a clear error for a run of another analysis or without it."""
    run = store.get_run(run_id)  # raises for an unknown run
    if run.analysis != analysis:
        raise InvalidParamsError(
            f"run {run_id} is a {run.analysis} run; this format exports {analysis} runs"
        )
    found = [a for a in store.artifacts(run_id) if a["name"] == name]
    if not found:
        raise InvalidParamsError(f"run {run_id} ({run.status}) has no {name}")
    try:
        return Path(found[0]["path"]).read_bytes()
    except OSError as error:
        raise HeadscopeError(f"run {run_id}'s {name} cannot be read: {error}") from None
