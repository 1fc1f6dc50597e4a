"""The OpenRPC document (`rpc.discover`), generated from the method table and registry.

Each method's params are its pydantic model's fields; its result is the JSON schema
of its result type. Every installed analysis's params schema is published under
`components.schemas["analysis.<name>.params"]`, and `runs.submit`'s `params`
accepts any of them. Shared definitions live in `components.schemas`, so every
`$ref` in the document resolves within it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import TypeAdapter

from .errors import ERRORS
from .protocol import RpcMethod

OPENRPC_VERSION = "1.2.6"
COMPONENTS = "#/components/schemas/"


def analysis_schema_name(analysis: str) -> str:
    return f"analysis.{analysis}.params"


def openrpc_document(methods: Iterable[RpcMethod], registry: Any) -> dict[str, Any]:
    from ..version import __version__

    schemas: dict[str, Any] = {}
    for name, cls in sorted(registry.analyses.items()):
        prefix = f"analysis.{name}."
        schema = _schema(cls.Params, schemas, prefix)
        schema.setdefault("description", f"Params of the {name} analysis: {cls.summary}")
        schemas[analysis_schema_name(name)] = schema
    documented = [_method(method, registry, schemas) for method in methods]
    return {
        "openrpc": OPENRPC_VERSION,
        "info": {
            "title": "headscope",
            "version": __version__,
            "description": "Find, score and steer attention heads: analyses as jobs, "
            "findings as queries.",
        },
        "methods": documented,
        "components": {"schemas": schemas},
    }


def _schema(annotation: Any, schemas: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """JSON schema of a type; its definitions go to `schemas` (names get `prefix`)."""
    schema = TypeAdapter(annotation).json_schema(ref_template=COMPONENTS + prefix + "{model}")
    for key, definition in schema.pop("$defs", {}).items():
        schemas[prefix + key] = definition
    return schema


def _method(method: RpcMethod, registry: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    params_schema = _schema(method.params, schemas)
    required = set(params_schema.get("required", []))
    params = []
    for name, schema in params_schema.get("properties", {}).items():
        schema = _specialise(method.name, name, schema, registry)
        descriptor: dict[str, Any] = {"name": name, "required": name in required, "schema": schema}
        if "description" in schema:
            descriptor["description"] = schema["description"]
        params.append(descriptor)
    result_schema = _schema(method.result, schemas)
    documented: dict[str, Any] = {
        "name": method.name,
        "summary": method.summary,
        "paramStructure": "by-name",
        "params": params,
        "result": {"name": "result", "schema": result_schema},
        "errors": [
            {"code": code, "message": ERRORS[code][0], "data": ERRORS[code][1]}
            for code in method.errors
        ],
    }
    if method.description:
        documented["description"] = method.description
    return documented


def _specialise(method: str, param: str, schema: dict[str, Any], registry: Any) -> dict[str, Any]:
    """runs.submit: `analysis` is one of the installed ones, `params` matches its schema."""
    if method != "runs.submit" or not registry.analyses:
        return schema
    names = sorted(registry.analyses)
    if param == "analysis":
        return {**schema, "enum": names}
    if param == "params":
        refs = [{"$ref": COMPONENTS + analysis_schema_name(name)} for name in names]
        return {**schema, "anyOf": refs}
    return schema
