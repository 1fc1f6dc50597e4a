"""The analysis contract: what a plugin implements and what it gets to work with.

    class MyAnalysis(Analysis):
        name = "my-analysis"
        summary = "One line for listings."

        class Params(BaseModel):
            n_prompts: int = 8

        def run(self, ctx: RunContext, params: Params) -> Finding:
            finding = Finding()
            ...                                  # ctx.model, ctx.progress(...)
            finding.add_head_scores("my_score", scores)   # [layers, heads]
            finding.add_metric("accuracy", 0.93)
            return finding

`Params` defaults must run on the embedded model on a 2-core CPU in minutes.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticSerializationError, to_json

from .budget import MemoryBudget
from .errors import (
    CancelledError,
    HeadscopeError,
    InvalidParamsError,
    RunNotFoundError,
    param_error,
    validation_error,
)
from .runs import FINISHED, MAX_INT, RunSummary

if TYPE_CHECKING:
    from .models import ModelHandle


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def top_heads(matrix: torch.Tensor, k: int) -> list[dict]:
    """The k highest entries of a [layers, heads] score matrix, as summary rows."""
    flat = matrix.flatten()
    values, index = flat.topk(min(k, flat.numel()))
    heads = matrix.shape[1]
    return [
        {"layer": int(i) // heads, "head": int(i) % heads, "value": round(float(v), 4)}
        for v, i in zip(values, index, strict=True)
    ]


@dataclass
class Artifact:
    """A file a run produces: written under the run's artifact folder on save."""

    name: str
    data: bytes
    media_type: str = "application/octet-stream"
    description: str = ""


@dataclass
class Finding:
    """What an analysis returns: per-head scores, run metrics, artifacts, a summary.

    `summary` is JSON for display (tables the CLI prints, e.g. top heads); the
    queryable numbers are the head scores and metrics.
    """

    head_scores: list[tuple[int, int, str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def add_head_scores(self, metric: str, values: Any) -> None:
        """Add one metric for every head: a [layers, heads] array or {(layer, head): v}."""
        if isinstance(values, Mapping):
            for (layer, head), value in values.items():
                self.head_scores.append((int(layer), int(head), metric, float(value)))
            return
        array = (
            values.detach().cpu().numpy()
            if isinstance(values, torch.Tensor)
            else np.asarray(values)
        )
        if array.ndim != 2:
            raise ValueError(
                f"head scores for {metric!r} must be [layers, heads], got {array.shape}"
            )
        for layer in range(array.shape[0]):
            for head in range(array.shape[1]):
                self.head_scores.append((layer, head, metric, float(array[layer, head])))

    def add_metric(self, name: str, value: float) -> None:
        self.metrics[name] = float(value)

    def add_json(self, name: str, data: Any, description: str = "") -> None:
        payload = json.dumps(data, indent=2, default=str).encode()
        self.artifacts.append(Artifact(name, payload, "application/json", description))

    def add_figure(self, name: str, figure: Any, description: str = "") -> None:
        """Add a matplotlib figure as a PNG artifact (and close it)."""
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        self.artifacts.append(Artifact(name, buffer.getvalue(), "image/png", description))

    def head_metric_names(self) -> list[str]:
        return sorted({metric for _, _, metric, _ in self.head_scores})


class FindingsReader:
    """Read access to earlier runs, so one analysis can build on another's heads."""

    def __init__(self, store: Any, registry: Any = None):
        self._store = store
        self._registry = registry

    def run(self, run_id: int):
        return self._store.get_run(run_id)

    def require_run(self, run_id: int, field: str) -> RunSummary:
        """The run that param `field` names, if it exists and has or may still get
        results (it may be queued or running: runs on one model execute in order)."""
        missing = param_error(field, f"no run with id {run_id}")
        if not 1 <= run_id <= MAX_INT:  # beyond the store's ids
            raise missing
        try:
            run = self._store.get_run(run_id)
        except RunNotFoundError:
            raise missing from None
        if run.status in FINISHED and run.status != "succeeded":
            raise param_error(field, f"run {run_id} {run.status}: it has no results")
        return run

    def head_metric(self, run_id: int, metric: str | None = None) -> str:
        """`metric`, or the primary metric of the analysis that made the run."""
        run = self._store.get_run(run_id)
        chosen = metric or (self._registry.head_metric(run.analysis) if self._registry else None)
        if chosen is None:
            raise InvalidParamsError(f"run {run_id} ({run.analysis}): name the head metric to use")
        return chosen

    def head_scores(self, run_id: int, metric: str) -> dict[tuple[int, int], float]:
        rows = self._store.head_scores(run_id, metric)
        if not rows:
            run = self._store.get_run(run_id)
            raise InvalidParamsError(
                f"run {run_id} ({run.analysis}, {run.status}) has no head scores named {metric!r}"
            )
        return {(r["layer"], r["head"]): r["value"] for r in rows}

    def metrics(self, run_id: int) -> dict[str, float]:
        return self._store.metrics(run_id)


class RunContext:
    """What an analysis works with: the model, randomness, progress, cancellation."""

    def __init__(
        self,
        model_loader: Callable[[], ModelHandle],
        seed: int,
        progress: Callable[[float, float | None, str], bool | None] | None = None,
        cancel_event: threading.Event | None = None,
        findings: FindingsReader | None = None,
        registry: Any = None,
        run_id: int | None = None,
        workdir: Path | None = None,
        max_memory: int | None = None,
    ):
        self._model_loader = model_loader
        self._model: ModelHandle | None = None
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._progress = progress
        self._cancel = cancel_event or threading.Event()
        self.findings = findings
        self.registry = registry
        self.run_id = run_id
        self.workdir = workdir
        #: how many prompts go into one pass (`core.budget.run_batched`)
        self.budget = MemoryBudget(max_memory)

    @property
    def model(self) -> ModelHandle:
        if self._model is None:
            if self._model_loader is None:
                raise HeadscopeError("this copy of the run context has no model")
            self._model = self._model_loader()
        return self._model

    def __getstate__(self) -> dict[str, Any]:
        """The copy a remote request ships with code that holds the context: no
        model loader, progress, findings or registry (the server has none of them)."""
        state = dict(self.__dict__)
        for name in ("_model_loader", "_model", "_progress", "findings", "registry"):
            state[name] = None
        del state["_cancel"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cancel = threading.Event()

    def torch_generator(self, offset: int = 0) -> torch.Generator:
        """A torch generator seeded from the run seed (offset for independent streams)."""
        return torch.Generator().manual_seed(self.seed + offset)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise CancelledError("run cancelled")

    def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """Report progress; this is also where a cancelled run stops."""
        if self._progress is not None and self._progress(done, total, message):
            self._cancel.set()
        self.check_cancelled()

    def task(self, name: str):
        return self.registry.task(name)


class Analysis:
    """Base class for analyses; subclasses set `name`, `Params` and implement `run`."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    summary: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    #: the head metric shown by default in plots and tables
    primary_metric: ClassVar[str | None] = None
    #: default head set for comparisons: ("threshold", x) or ("top", k)
    head_selection: ClassVar[tuple[str, float]] = ("top", 10)

    def run(self, ctx: RunContext, params: BaseModel) -> Finding:
        raise NotImplementedError

    @classmethod
    def check(cls, params: BaseModel, handle: ModelHandle, registry: Any) -> None:
        """Checks that need the loaded model (lengths within its positions, layers
        that exist); raise `InvalidParamsError`. Runs before the run is stored when
        the model is at hand (the CLI), and when the run starts otherwise (the
        service). `registry` resolves tasks and models by name."""

    @classmethod
    def check_runs(cls, params: BaseModel, findings: FindingsReader, model: str) -> None:
        """Checks against the stored runs the params name (a `from_run` that must
        exist, be on `model`...); raise `InvalidParamsError`. They need no model, so
        they run before the run is stored, from the CLI and `runs.submit` alike; a
        named run may still be queued or running then (`FindingsReader.require_run`)."""

    @classmethod
    def check_held_out(cls, params: BaseModel, findings: FindingsReader, seed: int) -> None:
        """Checks that need the run's seed too: e.g. that a run whose heads are reused
        never saw the examples this run holds out (the split depends on the seed).
        Called right after `check_runs`; raise `InvalidParamsError`."""

    @classmethod
    def parse_params(cls, values: Mapping[str, Any] | None) -> BaseModel:
        """Validate raw params strictly, as the JSON they arrive as (RPC bodies, params
        files, `-p` values): "3", true and 2.0 are not integers, while a JSON list
        is a tuple. Errors name each bad field."""
        what = f"invalid params for {cls.name}"
        try:
            raw = to_json(dict(values or {}))
        except PydanticSerializationError as error:
            raise InvalidParamsError(f"{what}: not JSON values: {error}") from None
        try:
            return cls.Params.model_validate_json(raw, strict=True)
        except ValidationError as error:
            raise validation_error(error, what) from None

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "version": cls.version,
            "summary": cls.summary,
            "primary_metric": cls.primary_metric,
            "params_schema": cls.Params.model_json_schema(),
        }
