"""Running an analysis as a recorded job.

`prepare` validates everything that can be checked before work starts (analysis
name, params, seed, model name, the stored runs the params name); `execute` loads the model, runs the analysis and writes
its findings in one transaction. Bad input is rejected before a run row exists, so
nothing half-written is ever stored; failures during the work record the error on
the run and leave every other run untouched.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .analysis import Analysis, FindingsReader, RunContext
from .budget import MemoryBudget
from .devices import PeakMemory, Placement, resolve_placement
from .errors import CancelledError, HeadscopeError, InvalidParamsError, RunAlreadyFinishedError
from .models import ModelHandle
from .runs import MAX_NAME_LENGTH, MAX_SEED

log = logging.getLogger("headscope.jobs")

TRACKED_PACKAGES = ("torch", "transformers", "nnsight", "pluggy", "sqlalchemy", "numpy")

INTERRUPTED_BY_USER = "interrupted (Ctrl-C)"

# progress(done, total, message)
ProgressCallback = Callable[[float, float | None, str], None]


def package_versions(extra: dict[str, str | None] | None = None) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("headscope", *TRACKED_PACKAGES):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions.update(extra or {})
    return versions


@dataclass
class PreparedRun:
    """A validated request, ready to be recorded and executed."""

    analysis: type[Analysis]
    model_name: str
    params: BaseModel
    seed: int
    plugin: str | None
    plugin_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    placement: Placement | None = None  # None for remote models
    max_memory: int | None = None  # bytes for batches; None: a share of free memory

    @property
    def params_json(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")


def prepare(
    registry: Any,
    analysis: str,
    model: str,
    params: dict | None,
    seed: int = 0,
    findings: FindingsReader | None = None,
    device: str | None = None,
    dtype: str | None = None,
    device_map: str | None = None,
    max_memory: str | int | None = None,
) -> PreparedRun:
    """Check the analysis, params, seed, model name, placement (device, dtype,
    device map; see `core.devices`) and memory budget, and with `findings` the
    stored runs the params name; raises before anything is stored."""
    budget = MemoryBudget.parse(max_memory)
    if not 0 <= seed <= MAX_SEED:
        raise InvalidParamsError(f"seed {seed} is outside 0..{MAX_SEED}")
    if len(model) > MAX_NAME_LENGTH:
        raise InvalidParamsError(
            f"a model name of {len(model)} characters is longer than {MAX_NAME_LENGTH}"
        )
    cls = registry.analysis(analysis)
    parsed = cls.parse_params(params)
    spec = registry.models.resolve(model)
    plugin = registry.analysis_plugins.get(analysis)
    version = registry.plugin_version(plugin)
    placement = None if spec.remote else resolve_placement(device, dtype, device_map)
    prepared = PreparedRun(cls, spec.name, parsed, int(seed), plugin, version, placement=placement)
    prepared.max_memory = budget.max_bytes
    if findings is not None:
        check_runs(prepared, findings)
    return prepared


def check_runs(prepared: PreparedRun, findings: FindingsReader) -> None:
    """The stored runs the params name exist and fit (`Analysis.check_runs`)."""
    prepared.analysis.check_runs(prepared.params, findings, prepared.model_name)
    prepared.analysis.check_held_out(prepared.params, findings, prepared.seed)


def check_against_model(prepared: PreparedRun, handle: ModelHandle, registry: Any) -> None:
    """Model-dependent validation (e.g. lengths within the model's positions)."""
    prepared.analysis.check(prepared.params, handle, registry)


def record(store: Any, prepared: PreparedRun, submitted_by: str | None = None) -> int:
    """Write the run as queued (by the named token, if any); returns its id."""
    versions = package_versions({f"plugin:{prepared.plugin}": prepared.plugin_version})
    return store.create_run(
        analysis=prepared.analysis.name,
        analysis_version=prepared.analysis.version,
        model_name=prepared.model_name,
        params=prepared.params_json,
        seed=prepared.seed,
        plugin=prepared.plugin,
        packages=versions,
        submitted_by=submitted_by,
    )


class _ProgressRelay:
    """Forwards progress to the UI and (throttled) to the store; learns of cancels."""

    def __init__(self, store: Any, run_id: int, ui: ProgressCallback | None, every: float = 0.5):
        self.store, self.run_id, self.ui, self.every = store, run_id, ui, every
        self._last = 0.0

    def __call__(self, done: float, total: float | None, message: str) -> bool:
        if self.ui is not None:
            self.ui(done, total, message)
        now = time.monotonic()
        finished = total is not None and done >= total
        if now - self._last >= self.every or finished:
            self._last = now
            return self.store.update_progress(self.run_id, done, total, message)
        return False


def execute(
    store: Any,
    registry: Any,
    run_id: int,
    prepared: PreparedRun,
    model_loader: Callable[[], ModelHandle],
    progress: ProgressCallback | None = None,
    cancel_event: threading.Event | None = None,
) -> Any:
    """Run a recorded (queued) run to completion; returns its final summary."""
    cancel_event = cancel_event or threading.Event()
    try:
        handle = model_loader()
        check_against_model(prepared, handle, registry)
        model_id = store.ensure_model(handle.info())
        store.mark_running(run_id, model_id, handle.revision)
        ctx = RunContext(
            model_loader=lambda: handle,
            seed=prepared.seed,
            progress=_ProgressRelay(store, run_id, progress),
            cancel_event=cancel_event,
            findings=FindingsReader(store, registry),
            registry=registry,
            run_id=run_id,
            workdir=store.artifacts_dir(run_id),
            max_memory=prepared.max_memory,
        )
        if store.cancel_requested(run_id):
            raise CancelledError("run cancelled")
        with PeakMemory([] if handle.remote else handle.devices()) as peak:
            finding = prepared.analysis().run(ctx, prepared.params)
        artifacts = _write_artifacts(store, run_id, finding)
        placement = run_placement(handle, peak.bytes)
        summary = {**finding.summary, "placement": placement}
        store.finish_run(run_id, finding.head_scores, finding.metrics, artifacts, summary)
    except CancelledError:
        store.fail_run(run_id, "cancelled", status="cancelled", only_unfinished=True)
    except RunAlreadyFinishedError as error:  # another attempt won: leave its result
        log.warning("%s", error)
    except KeyboardInterrupt:  # Ctrl-C in the CLI: say so now, not at the next start
        store.fail_run(run_id, INTERRUPTED_BY_USER, status="interrupted", only_unfinished=True)
        raise
    except HeadscopeError as error:
        store.fail_run(run_id, str(error), only_unfinished=True)
    except Exception as error:  # analysis bugs: keep the run, log the traceback
        log.exception("run %s failed", run_id)
        store.fail_run(run_id, f"{type(error).__name__}: {error}", only_unfinished=True)
    return store.get_run(run_id)


def run_placement(handle: ModelHandle, peak_bytes: int | None) -> dict[str, Any]:
    """Where a run ran, for its record: device(s), dtype, device map, peak memory
    (see `core.devices.PeakMemory`; 0 for remote models, measured on the server)."""
    info = handle.info()
    return {
        "device": info["device"],
        "devices": info["devices"],
        "dtype": info["dtype"],
        "device_map": info["device_map"],
        "peak_memory_bytes": int(peak_bytes or 0),
    }


def _write_artifacts(store: Any, run_id: int, finding: Any) -> list[dict[str, Any]]:
    folder = store.artifacts_dir(run_id)
    rows = []
    for artifact in finding.artifacts:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in artifact.name)
        path = folder / safe
        path.write_bytes(artifact.data)
        rows.append(
            {
                "name": artifact.name,
                "media_type": artifact.media_type,
                "path": str(path),
                "size": len(artifact.data),
                "description": artifact.description or None,
            }
        )
    return rows
