"""MCP resources: stored runs as JSON, and heatmaps as PNG images.

`headscope://runs/{run_id}` is the run document `runs.get` answers (status,
params, metrics, every head score, artifacts); `.../heatmaps/{metric}` draws one
head metric as a layer x head heatmap (`core.plots`, as `headscope plot` does);
`.../artifacts/{name}` is a file the run stored (the PNG figures analyses draw).
Reads raise `HeadscopeError`s, which the server answers with their RPC codes.
"""

from __future__ import annotations

import io
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from pydantic_core import to_jsonable_python

from ..errors import HeadscopeError, InvalidParamsError
from ..runs import run_document

RUN_URI = "headscope://runs/{run_id}"
HEATMAP_URI = RUN_URI + "/heatmaps/{metric}"
ARTIFACT_URI = RUN_URI + "/artifacts/{name}"
JSON, PNG = "application/json", "image/png"

#: (URI template, name, description, media type) for resources/templates/list
TEMPLATES = (
    (RUN_URI, "run", "A run: status, progress, params, metrics, head scores, artifacts.", JSON),
    (HEATMAP_URI, "heatmap", "One head metric of a run as a layer x head heatmap.", PNG),
    (ARTIFACT_URI, "artifact", "A file the run stored (figures are PNG).", None),
)
_PATTERN = re.compile(r"headscope://runs/(\d+)(?:/(heatmaps|artifacts)/([^/]+))?")
_PLOTTING = threading.Lock()  # pyplot's figure registry is shared by all threads


@dataclass(frozen=True)
class Entry:
    uri: str
    name: str
    description: str
    mime_type: str | None


@dataclass(frozen=True)
class Contents:
    mime_type: str
    text: str | None = None
    data: bytes | None = None


def list_entries(store: Any, offset: int, limit: int) -> tuple[list[Entry], int | None]:
    """Runs newest first, each succeeded one with its heatmaps and artifacts; and the
    offset of the next page (None on the last)."""
    runs = store.list_runs(None, None, None, limit, offset)
    entries = []
    for run in runs:
        uri = RUN_URI.format(run_id=run.id)
        title = f"run {run.id}: {run.analysis} on {run.model}"
        entries.append(Entry(uri, f"run {run.id}", f"{title} ({run.status})", JSON))
        if run.status != "succeeded":
            continue
        for metric in store.head_metrics(run.id):
            entries.append(
                Entry(
                    HEATMAP_URI.format(run_id=run.id, metric=quote(metric, safe="")),
                    f"run {run.id} {metric} heatmap",
                    f"{title}: {metric} per head",
                    PNG,
                )
            )
        for artifact in store.artifacts(run.id):
            entries.append(
                Entry(
                    ARTIFACT_URI.format(run_id=run.id, name=quote(artifact["name"], safe="")),
                    f"run {run.id} {artifact['name']}",
                    artifact["description"] or f"{title}: {artifact['name']}",
                    artifact["media_type"],
                )
            )
    more = offset + len(runs) < store.count_runs(None, None, None)
    return entries, offset + len(runs) if more else None


def read(store: Any, uri: str) -> Contents:
    match = _PATTERN.fullmatch(uri)
    if match is None:
        forms = ", ".join(template for template, *_ in TEMPLATES)
        raise InvalidParamsError(f"unknown resource {uri!r}; headscope serves {forms}")
    run_id, kind, name = int(match[1]), match[2], unquote(match[3] or "")
    if kind == "heatmaps":
        return Contents(PNG, data=heatmap_png(store, run_id, name))
    if kind == "artifacts":
        return _artifact(store, run_id, name)
    document = to_jsonable_python(run_document(store, run_id), inf_nan_mode="null")
    return Contents(JSON, text=json.dumps(document, allow_nan=False))


def heatmap_png(store: Any, run_id: int, metric: str) -> bytes:
    from matplotlib import pyplot

    from ..plots import head_heatmap, scores_matrix

    run = store.get_run(run_id)
    available = store.head_metrics(run_id)
    if metric not in available:
        has = f"it has: {', '.join(available)}" if available else "it has no per-head scores"
        raise InvalidParamsError(
            f"run {run_id} ({run.analysis}, {run.status}) has no head metric {metric!r}; {has}"
        )
    matrix = scores_matrix(store.head_scores(run_id, metric))
    title = f"run {run_id}: {run.analysis} on {run.model} — {metric}"
    buffer = io.BytesIO()
    with _PLOTTING:
        figure = head_heatmap(matrix, title, metric)
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        pyplot.close(figure)
    return buffer.getvalue()


def _artifact(store: Any, run_id: int, name: str) -> Contents:
    store.get_run(run_id)  # an unknown run is "run not found"
    artifacts = {artifact["name"]: artifact for artifact in store.artifacts(run_id)}
    if name not in artifacts:
        has = ", ".join(artifacts) or "none"
        raise InvalidParamsError(f"run {run_id} has no artifact {name!r}; it has: {has}")
    artifact = artifacts[name]
    try:
        data = Path(artifact["path"]).read_bytes()
    except OSError as error:
        raise HeadscopeError(f"artifact {name!r} of run {run_id}: {error.strerror}") from None
    media_type = artifact["media_type"]
    if media_type.startswith("text/") or media_type == JSON:
        return Contents(media_type, text=data.decode("utf-8", errors="replace"))
    return Contents(media_type, data=data)
