"""The JSON-RPC methods: params models, handlers and the method table.

Every method works for whatever the plugin registry holds: analyses, their params
and models are looked up by name, never listed here. Handlers return plain data;
`protocol` validates params before a handler runs and maps errors to codes.
Params are strict (no "5" for 5) and closed (unknown names are errors).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..budget import parse_memory
from ..compare import MAX_BANDS, compare_runs
from ..devices import resolve_placement
from ..errors import InvalidParamsError
from ..models import DEFAULT_MODEL
from ..runs import (
    MAX_SEED,
    RUN_STATUSES,
    FindingsQuery,
    HeadQuery,
    Name,
    StoredInt,
    head_across_runs,
    model_name,
    query_findings,
    require_succeeded,
    run_document,
)
from . import errors as codes
from . import results
from .errors import ModelBusyError
from .protocol import RpcMethod
from .service import Service


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class NoParams(_Params):
    pass


class AnalysisName(_Params):
    name: Name = Field(description="Analysis name (see analyses.list).")


class ModelName(_Params):
    name: Name = Field(
        description="Registered model name, model directory, .gguf file or org/name hub id."
    )


class PlacementFields(_Params):
    device: Name | None = Field(
        None,
        description="auto, cpu, cuda, cuda:N or mps (default: HEADSCOPE_DEVICE, else auto).",
    )
    dtype: Name | None = Field(
        None,
        description="auto, fast, float32, bfloat16 or float16 (default: HEADSCOPE_DTYPE, else auto).",
    )
    device_map: Literal["auto"] | None = Field(
        None, description="auto: shard the layers over every visible GPU."
    )

    def placement(self) -> dict[str, str | None]:
        return {"device": self.device, "dtype": self.dtype, "device_map": self.device_map}


class LoadParams(ModelName, PlacementFields):
    pass


class SubmitParams(PlacementFields):
    analysis: Name = Field(description="Analysis name (see analyses.list).")
    model: Name = Field(DEFAULT_MODEL, description="Model name (see models.list).")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The analysis's params (schema: analyses.describe); defaults fill the rest.",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for every random choice.")
    max_memory: int | str | None = Field(
        None,
        description="Memory the run's batches may use: bytes or a size such as '8GB'; "
        "default: half of what the device has free.",
    )

    @field_validator("max_memory")
    @classmethod
    def _memory(cls, value: int | str | None) -> int | None:
        if value is None:
            return None
        try:
            return parse_memory(value)
        except InvalidParamsError as error:
            raise ValueError(str(error)) from None


class RunId(_Params):
    run_id: StoredInt = Field(ge=1, description="Run id (from runs.submit or runs.list).")


class GetParams(RunId):
    head_scores: bool = Field(True, description="Include every per-head score.")


class ListParams(_Params):
    analysis: Name | None = Field(None, description="Only runs of this analysis.")
    model: Name | None = Field(None, description="Only runs on this model.")
    status: Literal[RUN_STATUSES] | None = Field(None, description="Only runs in this state.")  # type: ignore[valid-type]
    limit: int = Field(50, ge=1, le=500, description="Runs per page, newest first.")
    offset: StoredInt = Field(0, ge=0, description="Runs to skip.")


class CompareParams(_Params):
    run_a: StoredInt = Field(ge=1)
    run_b: StoredInt = Field(ge=1)
    metric: Name | None = Field(None, description="Head metric for both runs.")
    metric_a: Name | None = Field(None, description="Head metric for run_a (default: primary).")
    metric_b: Name | None = Field(None, description="Head metric for run_b (default: primary).")
    top_k: StoredInt | None = Field(None, ge=1, description="Head set: each run's k best heads.")
    threshold: float | None = Field(None, description="Head set: heads scoring above this.")
    bands: int = Field(3, ge=1, le=MAX_BANDS, description="Layer bands for the per-band overlap.")

    @model_validator(mode="after")
    def _one_rule(self) -> CompareParams:
        if self.top_k is not None and self.threshold is not None:
            raise ValueError("give top_k or threshold, not both")
        return self


# ----------------------------------------------------------------------------------
# handlers
# ----------------------------------------------------------------------------------
def plugins_list(service: Service, _: NoParams) -> list[dict[str, Any]]:
    fields = results.PluginEntry.model_fields
    return [{key: info.as_dict()[key] for key in fields} for info in service.registry.plugins]


def analyses_list(service: Service, _: NoParams) -> list[dict[str, Any]]:
    registry = service.registry
    return [
        {
            "name": name,
            "version": cls.version,
            "plugin": registry.analysis_plugins.get(name),
            "summary": cls.summary,
            "primary_metric": cls.primary_metric,
        }
        for name, cls in sorted(registry.analyses.items())
    ]


def analyses_describe(service: Service, params: AnalysisName) -> dict[str, Any]:
    return service.registry.analysis(params.name).describe()


def models_list(service: Service, _: NoParams) -> list[dict[str, Any]]:
    loaded = {handle.name: handle for handle in service.pool.loaded()}
    rows = [
        {
            "name": spec.name,
            "description": spec.description,
            "source": spec.source.describe(),
            "ready": spec.source.is_ready(),
            "loaded": spec.name in loaded,
            "plugin": spec.plugin,
        }
        for spec in service.registry.models.specs()
    ]
    registered = {row["name"] for row in rows}
    for name, handle in sorted(loaded.items()):  # paths and hub ids loaded by name
        if name not in registered:
            source = handle.spec.source.describe()
            rows.append(
                {
                    "name": name,
                    "description": handle.spec.description,
                    "source": source,
                    "ready": True,
                    "loaded": True,
                    "plugin": None,
                }
            )
    return rows


def models_load(service: Service, params: LoadParams) -> dict[str, Any]:
    spec = service.registry.models.resolve(params.name)
    placement = None if spec.remote else resolve_placement(**params.placement())
    return service.workers.load(spec.name, placement).info()


def models_unload(service: Service, params: ModelName) -> dict[str, Any]:
    name = service.registry.models.resolve(params.name).name
    busy = service.workers.pending(name)
    if busy:
        raise ModelBusyError(f"model {name!r} has queued or running runs {busy}; cancel or wait")
    return {"name": name, "unloaded": service.pool.unload(name)}


def runs_submit(service: Service, params: SubmitParams) -> dict[str, Any]:
    submitted_by = service.caller.name if service.caller else None
    try:
        run_id = service.workers.submit(
            params.analysis,
            params.model,
            params.params,
            params.seed,
            submitted_by,
            max_memory=params.max_memory,
            **params.placement(),
        )
    except InvalidParamsError as error:  # name analysis-param fields as the request does
        fields = [
            {**item, "field": "params" + (f".{item['field']}" if item.get("field") else "")}
            for item in error.errors
        ]
        raise InvalidParamsError(str(error), fields) from None
    return {"run_id": run_id, "status": "queued"}


def runs_get(service: Service, params: GetParams) -> dict[str, Any]:
    document = run_document(service.store, params.run_id)
    if not params.head_scores:
        document["head_scores"] = []
    return document


def runs_list(service: Service, params: ListParams) -> dict[str, Any]:
    model = model_name(service.registry, params.model)
    runs = service.store.list_runs(
        params.analysis, model, params.status, params.limit, params.offset
    )
    return {
        "total": service.store.count_runs(params.analysis, model, params.status),
        "limit": params.limit,
        "offset": params.offset,
        "runs": [run.as_dict() for run in runs],
    }


def runs_cancel(service: Service, params: RunId) -> dict[str, Any]:
    return {"run_id": params.run_id, "status": service.workers.cancel(params.run_id)}


def runs_compare(service: Service, params: CompareParams) -> dict[str, Any]:
    for run_id in (params.run_a, params.run_b):
        require_succeeded(service.store, run_id)
    rule, value = (
        ("top", params.top_k)
        if params.top_k is not None
        else ("threshold", params.threshold)
        if params.threshold is not None
        else (None, None)
    )
    return compare_runs(
        service.store,
        service.registry,
        params.run_a,
        params.run_b,
        params.metric_a or params.metric,
        params.metric_b or params.metric,
        rule,
        value,
        params.bands,
    )


def findings_query(service: Service, params: FindingsQuery) -> dict[str, Any]:
    return query_findings(service.store, service.registry, params)


def findings_head(service: Service, params: HeadQuery) -> dict[str, Any]:
    return head_across_runs(service.store, service.registry, params)


def rpc_discover(service: Service, _: NoParams) -> dict[str, Any]:
    from .openrpc import openrpc_document

    return openrpc_document(service_methods(service.registry), service.registry)


# ----------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------
_NAMES = (codes.UNKNOWN_ANALYSIS,)
_MODEL = (codes.UNKNOWN_MODEL, codes.MODEL_UNAVAILABLE)
_RESULTS = (codes.RUN_NOT_FOUND, codes.RUN_FAILED, codes.RUN_NOT_FINISHED)

METHODS: tuple[RpcMethod, ...] = (
    RpcMethod(
        "plugins.list",
        NoParams,
        plugins_list,
        list[results.PluginEntry],
        "Installed plugins, what each provides, and load errors.",
    ),
    RpcMethod(
        "analyses.list",
        NoParams,
        analyses_list,
        list[results.AnalysisEntry],
        "Installed analyses.",
    ),
    RpcMethod(
        "analyses.describe",
        AnalysisName,
        analyses_describe,
        results.AnalysisDescription,
        "An analysis with the JSON schema of its params.",
        errors=_NAMES,
    ),
    RpcMethod(
        "models.list",
        NoParams,
        models_list,
        list[results.ModelEntry],
        "Registered models: ready offline or not, loaded here or not.",
    ),
    RpcMethod(
        "models.load",
        LoadParams,
        models_load,
        results.ModelInfo,
        "Load a model (or find it loaded) on a device and in a precision, and describe it.",
        "Blocks until the model is in memory: seconds for cached models, longer the "
        "first time a GGUF model is converted. Runs load their model themselves. One "
        "copy is kept per device and dtype; a device this machine lacks is invalid params.",
        errors=_MODEL,
    ),
    RpcMethod(
        "models.unload",
        ModelName,
        models_unload,
        results.Unloaded,
        "Drop a loaded model from memory.",
        errors=(codes.UNKNOWN_MODEL, codes.MODEL_BUSY),
    ),
    RpcMethod(
        "runs.submit",
        SubmitParams,
        runs_submit,
        results.Submitted,
        "Queue an analysis run; returns its id at once.",
        "Analysis, model name (for a path, its files too), params and the stored runs "
        "the params name are checked before anything is stored (-32602 names each bad "
        "field as params.<name>); checks that need the loaded model run when the run "
        "starts and fail the run. Runs on one model execute one at a time in "
        "submission order; poll runs.get for status and progress. When as many runs "
        "as the service allows are queued, the run is refused (-32009) and not stored.",
        errors=(*_NAMES, *_MODEL, codes.SHUTTING_DOWN, codes.QUEUE_FULL),
    ),
    RpcMethod(
        "runs.get",
        GetParams,
        runs_get,
        results.RunDocument,
        "A run: status, progress, params, and its results once it succeeded.",
        errors=(codes.RUN_NOT_FOUND,),
    ),
    RpcMethod(
        "runs.list",
        ListParams,
        runs_list,
        results.RunPage,
        "Stored runs, newest first, filtered and paginated.",
    ),
    RpcMethod(
        "runs.cancel",
        RunId,
        runs_cancel,
        results.Cancelled,
        "Stop a run: at once if queued, at its next progress point if running.",
        "Poll runs.get until the status is cancelled. Finished runs are left as they are.",
        errors=(codes.RUN_NOT_FOUND,),
    ),
    RpcMethod(
        "runs.compare",
        CompareParams,
        runs_compare,
        results.Comparison,
        "Overlap of two runs' head sets (Jaccard and overlap coefficient, by layer band) "
        "and the correlation of their scores.",
        "Each run's head set comes from its metric (default: its analysis's primary "
        "metric) and its analysis's own selection rule, unless top_k or threshold is given.",
        errors=_RESULTS,
    ),
    RpcMethod(
        "findings.query",
        FindingsQuery,
        findings_query,
        results.FindingsPage,
        "Top heads by a metric, for a run, a model or an analysis.",
        "Only succeeded runs contribute. Ties are ordered by run, layer and head, so "
        "pages are stable.",
        errors=_RESULTS,
    ),
    RpcMethod(
        "findings.head",
        HeadQuery,
        findings_head,
        results.HeadAcrossRuns,
        "One head across every succeeded run: each run's scores for it, newest first.",
        "What every analysis found about the same head (layer and head from 0), on one "
        "model when `model` is given; `headscope runs head` answers the same.",
    ),
    RpcMethod(
        "rpc.discover",
        NoParams,
        rpc_discover,
        dict[str, Any],
        "This API as an OpenRPC document, with every installed analysis's params schema.",
    ),
)


#: the scope each built-in method needs (see `auth`: admin > submit > read); methods
#: plugins register may compute, so they need `submit`
SCOPES: dict[str, str] = {
    "plugins.list": "read",
    "analyses.list": "read",
    "analyses.describe": "read",
    "models.list": "read",
    "models.load": "admin",
    "models.unload": "admin",
    "runs.submit": "submit",
    "runs.get": "read",
    "runs.list": "read",
    "runs.cancel": "submit",
    "runs.compare": "read",
    "findings.query": "read",
    "findings.head": "read",
    "rpc.discover": "read",
}


def required_scope(method: str) -> str:
    return SCOPES.get(method, "submit")


def service_methods(registry: Any) -> tuple[RpcMethod, ...]:
    """The methods a service answers: the built-in ones, then those plugins register
    (`register_rpc_methods`), with `rpc.discover` last."""
    *builtin, discover = METHODS
    return (*builtin, *registry.rpc_methods, discover)
