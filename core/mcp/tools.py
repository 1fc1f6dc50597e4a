"""MCP tools: one per installed analysis, and the JSON-RPC methods an agent needs.

A tool is a JSON-RPC method under a name MCP clients accept: `run_<analysis>` is
`runs.submit` for that analysis (its params flat, beside `model` and `seed`);
`runs_get` is `runs.get`, and so on, with every method plugins register. Each
call goes through the method's own params model and handler, so validation,
results and errors are those of `headscope serve`. A call answers an `Outcome`:
the result, or a message and the JSON-RPC error object when it failed.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from ..errors import HeadscopeError, validation_error
from ..models import DEFAULT_MODEL
from ..plugins import Registry
from ..rpc import RpcMethod
from ..rpc.auth import Caller
from ..rpc.errors import ERRORS, FORBIDDEN, INTERNAL_ERROR, RUN_FAILED
from ..rpc.errors import error_object as rpc_error
from ..rpc.methods import SubmitParams, required_scope, service_methods
from ..runs import FINISHED

log = logging.getLogger("headscope.mcp")

#: built-in JSON-RPC methods offered as tools (plugin methods are all offered)
BUILTIN_TOOLS = (
    "models.list",
    "runs.get",
    "runs.list",
    "runs.cancel",
    "findings.query",
    "findings.head",
    "runs.compare",
)
RUN_FIELDS = ("model", "seed")  # the run's own fields beside an analysis's params

JOB_NOTE = (
    "Starts a run in the background and returns its run_id at once: poll runs_get "
    "until its status is succeeded, then read the top heads with findings_query or "
    "the resource headscope://runs/<run_id>. How long a run takes depends on the "
    f"analysis, its params and the machine: with defaults on {DEFAULT_MODEL}, from "
    "under a minute to tens of minutes on a 2-core CPU (docs/mcp.md lists measured "
    "times); on tiny-llama, seconds where the defaults fit it."
)


@dataclass(frozen=True)
class Outcome:
    """A tool call's answer: `data` is the result, or on failure the JSON-RPC error
    object (or, for a run that ended without results, its run document)."""

    data: Any
    error: str | None = None


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    method: RpcMethod
    #: the tool's arguments as the method's params
    params: Callable[[dict[str, Any]], dict[str, Any]] = dict

    def call(
        self, service: Any, arguments: dict[str, Any], caller: Caller | None = None
    ) -> Outcome:
        """Validate, run the method's handler, and answer; never raises. A `caller`
        (over HTTP) needs the method's scope, and runs it submits record its name."""
        if caller is not None:
            needed = required_scope(self.method.name)
            if not caller.allows(needed):
                message = (
                    f"Forbidden: {self.name} needs the {needed!r} scope, which "
                    f"{'token ' + repr(caller.name) if caller.name else 'this caller'} "
                    "does not hold"
                )
                failure = {"code": FORBIDDEN, "message": message, "data": {"required": needed}}
                return Outcome({"error": failure}, message)
            service = service.for_caller(caller)
        try:
            try:
                params = self.method.params.model_validate(self.params(arguments))
            except ValidationError as error:
                raise validation_error(error, f"invalid arguments for {self.name}") from None
            result = to_jsonable_python(self.method.handler(service, params), inf_nan_mode="null")
        except HeadscopeError as error:
            code, message, data = rpc_error(error)
            failure = {"code": code, "message": message, **({"data": data} if data else {})}
            return Outcome({"error": failure}, message)
        except Exception:  # a bug: log it, tell the agent only where to look
            reference = uuid.uuid4().hex[:12]
            log.exception("internal error in tool %s (ref %s)", self.name, reference)
            failure = {"code": INTERNAL_ERROR, "message": ERRORS[INTERNAL_ERROR][0]}
            message = f"Internal error (ref {reference}); the server log has the details"
            return Outcome({"error": {**failure, "data": {"ref": reference}}}, message)
        return Outcome(result, _no_results(result) if self.method.name == "runs.get" else None)


def _no_results(document: dict[str, Any]) -> str | None:
    """A run that finished without results is an error to the agent polling it."""
    run = document["run"]
    if run["status"] not in FINISHED or run["status"] == "succeeded":
        return None
    reason = f" ({run['error']})" if run["error"] else ""
    return f"{ERRORS[RUN_FAILED][0]}: run {run['id']} has no results: it {run['status']}{reason}"


def tool_name(name: str) -> str:
    """`runs.get` -> `runs_get`: MCP clients take letters, digits, `_` and `-` only."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def build_tools(registry: Registry) -> dict[str, Tool]:
    """The tools for what `registry` holds: analyses first, then methods."""
    methods = {method.name: method for method in service_methods(registry)}
    tools: dict[str, Tool] = {}
    for name, cls in sorted(registry.analyses.items()):
        tool = _analysis_tool(name, cls, methods["runs.submit"])
        if tool is not None:
            tools[tool.name] = tool
    offered = [*BUILTIN_TOOLS, *(method.name for method in registry.rpc_methods)]
    for method in (methods[name] for name in offered):
        tool = Tool(
            tool_name(method.name),
            " ".join(part for part in (method.summary, method.description) if part),
            method.params.model_json_schema(),
            method,
        )
        if tool.name in tools:
            log.warning("MCP tool %s is taken; method %s is left out", tool.name, method.name)
            continue
        tools[tool.name] = tool
    return tools


def _analysis_tool(name: str, cls: Any, submit: RpcMethod) -> Tool | None:
    schema = cls.Params.model_json_schema()
    properties = schema.get("properties", {})
    clash = [key for key in RUN_FIELDS if key in properties]
    if clash:
        log.warning("analysis %s has params named %s: it has no MCP tool", name, clash)
        return None
    run_fields = SubmitParams.model_json_schema()["properties"]
    schema = {**schema, "properties": {**properties, **{k: run_fields[k] for k in RUN_FIELDS}}}
    primary = f" Primary head metric: {cls.primary_metric}." if cls.primary_metric else ""

    def params(arguments: dict[str, Any]) -> dict[str, Any]:
        values = dict(arguments)
        run = {key: values.pop(key) for key in RUN_FIELDS if key in values}
        return {"analysis": name, **run, "params": values}

    return Tool(
        "run_" + tool_name(name), f"{cls.summary}{primary} {JOB_NOTE}", schema, submit, params
    )
