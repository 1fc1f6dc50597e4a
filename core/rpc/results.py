"""The shapes of method results, for the OpenRPC document.

Handlers return plain data (dicts from the store and the registry); these models
only describe it (a run is `core.runs.RunSummary` itself), so `rpc.discover` can publish a JSON schema for every result.
A test validates real results against the published schemas.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from ..runs import RunSummary


class PluginEntry(BaseModel):
    name: str
    version: str | None
    builtin: bool
    hooks: list[str]
    analyses: list[str]
    models: list[str]
    tasks: list[str]
    rpc_methods: list[str]
    error: str | None = Field(description="Why the plugin failed to load (then it is skipped).")


class AnalysisEntry(BaseModel):
    name: str
    version: str
    plugin: str | None
    summary: str
    primary_metric: str | None


class AnalysisDescription(BaseModel):
    name: str
    version: str
    summary: str
    primary_metric: str | None
    params_schema: dict[str, Any] = Field(description="JSON schema of the analysis's params.")


class ModelEntry(BaseModel):
    name: str
    description: str
    source: str
    ready: bool = Field(description="Loadable offline now (weights cached or built in).")
    loaded: bool = Field(description="Held in memory by this service.")
    plugin: str | None


class ModelInfo(BaseModel):
    name: str
    family: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    max_positions: int
    parameters: int
    source: str
    cache_path: str | None
    revision: str
    remote: bool | str
    device: str = Field(description="Where inputs go: cpu, cuda:N, mps, or remote.")
    devices: list[str] = Field(description="Every device holding weights (several if sharded).")
    dtype: str
    device_map: str | None
    memory_bytes: int = Field(description="Bytes the weights and buffers take.")
    load_seconds: float


class Unloaded(BaseModel):
    name: str
    unloaded: bool = Field(description="False when the model was not loaded.")


class Submitted(BaseModel):
    run_id: int
    status: str


class HeadScoreRow(BaseModel):
    layer: int
    head: int
    metric: str
    value: float | None = Field(description="null where the score is not a number.")


class ArtifactRow(BaseModel):
    name: str
    media_type: str
    path: str = Field(description="File path on the server's machine.")
    size: int
    description: str | None


class RunDocument(BaseModel):
    run: RunSummary
    metrics: dict[str, float | None]
    head_scores: list[HeadScoreRow]
    artifacts: list[ArtifactRow]


class RunPage(BaseModel):
    total: int = Field(description="Runs matching the filters, over all pages.")
    limit: int
    offset: int
    runs: list[RunSummary]


class Cancelled(BaseModel):
    run_id: int
    status: str = Field(description="cancelled at once if it was queued; running until it stops.")


class HeadRow(BaseModel):
    run_id: int
    model: str
    analysis: str
    layer: int
    head: int
    metric: str
    value: float | None


class FindingsPage(BaseModel):
    metric: str
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")
    heads: list[HeadRow]


class HeadInRun(BaseModel):
    run_id: int
    analysis: str
    model: str
    primary_metric: str | None = Field(description="The analysis's primary metric, if known.")
    scores: dict[str, float | None] = Field(description="Metric -> this head's score.")
    rank: int | None = Field(
        description="The head's place by the primary metric in this run (1: the highest)."
    )
    heads: int | None = Field(description="Heads the run scored by its primary metric.")


class HeadAcrossRuns(BaseModel):
    layer: int
    head: int
    runs: list[HeadInRun] = Field(description="Succeeded runs with scores for it, newest first.")


class ComparisonSide(BaseModel):
    run_id: int
    analysis: str
    model: str
    metric: str
    rule: str
    value: float
    heads: list[list[int]] = Field(description="[layer, head] pairs in the run's head set.")
    n_layers: int


class BandOverlap(BaseModel):
    band: str
    layers: list[int] = Field(description="First and last layer of the band.")
    size_a: int
    size_b: int
    intersection: int
    union: int
    jaccard: float
    overlap_coefficient: float


class ScoreCorrelation(BaseModel):
    heads: int = Field(description="Heads both runs score.")
    pearson: float | None = Field(description="None below two shared heads.")
    spearman: float | None


class Comparison(BaseModel):
    a: ComparisonSide
    b: ComparisonSide
    size_a: int
    size_b: int
    intersection: int
    union: int
    jaccard: float
    overlap_coefficient: float
    shared_heads: list[list[int]]
    bands: list[BandOverlap]
    correlation: ScoreCorrelation = Field(
        description="Pearson and Spearman correlation of the two runs' scores."
    )
