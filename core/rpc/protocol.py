"""JSON-RPC 2.0 messages in, responses out: the one module that uses jsonrpcserver.

jsonrpcserver (5.0.9) parses requests, checks them against the spec and routes them
to methods. Around it this module adds what a service needs and the library does not
do on its own:

- params are validated with each method's pydantic model: -32602 with field errors;
- a `HeadscopeError` becomes its documented code with its user-facing message; any
  other exception is logged with its traceback and answered "Internal error" with a
  reference to the log line, never with its text;
- results are made JSON-safe (datetimes, tuples, NaN -> null) inside the method, so
  a result that cannot be encoded is an internal error, not a broken response;
- a batch is answered item by item, so one bad item never rejects the others;
- request objects are checked by `check_request`, the library's request schema
  written as code (its jsonschema check cost as much as a findings query's SQL);
- a transport that authenticates passes the `Caller`: a method beyond its scopes
  is refused (-32012), and the handler's context is bound to the caller.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from jsonrpcserver import Error, Success, dispatch_to_serializable
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from ..errors import HeadscopeError
from .auth import Caller
from .errors import ERRORS, FORBIDDEN, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR
from .errors import error_object as headscope_error

log = logging.getLogger("headscope.rpc")


@dataclass(frozen=True)
class RpcMethod:
    """A method: its name, params model, handler and (for discovery) result and errors."""

    name: str
    params: type[BaseModel]
    handler: Callable[[Any, Any], Any]  # handler(context, params) -> JSON-able result
    result: Any = Any  # a type whose JSON schema describes the result
    summary: str = ""
    description: str = ""
    errors: tuple[int, ...] = field(default_factory=tuple)


def field_errors(error: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as [{field, message}], fields as dotted paths (null: the whole)."""
    return [
        {"field": ".".join(str(part) for part in item["loc"]) or None, "message": item["msg"]}
        for item in error.errors()
    ]


def error_response(code: int, message: str | None = None, data: Any = None) -> dict[str, Any]:
    """A response for a message that never reached a method (id unknown: null)."""
    error: dict[str, Any] = {"code": code, "message": message or ERRORS[code][0]}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "error": error, "id": None}


def encode(response: Any) -> str:
    return json.dumps(response, allow_nan=False, separators=(",", ":"))


class Endpoint:
    """Answers JSON-RPC messages with a fixed method table and context.

    `required_scope` names the scope each method needs; `bind_caller` gives the
    context a request's handlers see (say, one that knows the caller's name)."""

    def __init__(
        self,
        methods: Iterable[RpcMethod],
        context: Any,
        required_scope: Callable[[str], str] | None = None,
        bind_caller: Callable[[Any, Caller], Any] | None = None,
    ):
        self._callables = {method.name: _bind(method) for method in methods}
        self._context = context
        self._required_scope = required_scope
        self._bind_caller = bind_caller

    def handle(self, body: bytes | str, caller: Caller | None = None) -> str | None:
        """One message (a request or a batch) -> the response text, None if there is none.

        Without a caller (stdio, in-process use) every method may be called."""
        try:
            return self._handle(body, caller)
        except Exception:  # never leave a client without an answer
            return encode(_internal_error("handling a message"))

    def _handle(self, body: bytes | str, caller: Caller | None) -> str | None:
        try:
            text = body.decode("utf-8") if isinstance(body, bytes) else body
            message = json.loads(text, parse_constant=_not_json)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            return encode(error_response(PARSE_ERROR, data=str(error)))
        except RecursionError:
            return encode(error_response(PARSE_ERROR, data="nested too deeply"))
        if isinstance(message, list):
            if not message:
                return encode(error_response(INVALID_REQUEST, data="empty batch"))
            replies = [self._one(item, caller) for item in message]
            replies = [reply for reply in replies if reply is not None]
            return encode(replies) if replies else None
        reply = self._one(message, caller)
        return None if reply is None else encode(reply)

    def _one(self, request: Any, caller: Caller | None) -> dict[str, Any] | None:
        if not isinstance(request, dict):  # a nested list would pass as a batch
            return error_response(INVALID_REQUEST, data="a request must be a JSON object")
        context = self._context
        if caller is not None:
            needed = self._missing_scope(request, caller)
            if needed is not None:
                return _forbidden(request, caller, needed)
            if self._bind_caller is not None:
                context = self._bind_caller(context, caller)
        reply = dispatch_to_serializable(
            request,
            methods=self._callables,
            context=context,
            deserializer=lambda already_parsed: already_parsed,
            validator=check_request,
        )
        if reply is not None and reply.get("error", {}).get("message") == "Server error":
            # jsonrpcserver failed inside itself and put the exception text in `data`
            failed = _internal_error(f"dispatching {request.get('method')!r}", False)
            request_id = request.get("id")
            return {**failed, "id": request_id if isinstance(request_id, str | int) else None}
        return reply

    def _missing_scope(self, request: dict[str, Any], caller: Caller) -> str | None:
        """The scope the method needs that the caller lacks (None: it may call it)."""
        method = request.get("method")
        if self._required_scope is None or method not in self._callables:
            return None  # unknown methods get the library's own answer
        needed = self._required_scope(method)
        return None if caller.allows(needed) else needed


def _forbidden(request: dict[str, Any], caller: Caller, needed: str) -> dict[str, Any] | None:
    """The -32012 answer (none for a notification, which gets no answer anyway)."""
    if "id" not in request:
        return None
    request_id = request.get("id")
    who = f"token {caller.name!r}" if caller.name else "this caller"
    refused = error_response(
        FORBIDDEN,
        f"Forbidden: {request['method']} needs the {needed!r} scope, which {who} does not hold",
        {"required": needed, "scopes": sorted(caller.scopes)},
    )
    return {**refused, "id": request_id if isinstance(request_id, str | int) else None}


def _not_json(constant: str) -> Any:
    """NaN and Infinity are not JSON (Python's parser accepts them; no reply could echo them)."""
    raise ValueError(f"{constant} is not a JSON value")


_REQUEST_KEYS = frozenset({"jsonrpc", "method", "params", "id"})


def check_request(request: dict[str, Any]) -> None:
    """The JSON-RPC 2.0 request object rules (jsonrpcserver's request schema, as code).

    jsonrpcserver checks requests with jsonschema by default, which costs more than
    the rest of a findings query; these few comparisons check the same thing.
    """
    if (
        request.keys() - _REQUEST_KEYS
        or request.get("jsonrpc") != "2.0"
        or not isinstance(request.get("method"), str)
        or not isinstance(request.get("params", []), list | dict)
        or not isinstance(request.get("id"), str | int | float | None)
        or isinstance(request.get("id"), bool)
    ):
        raise ValueError("not a JSON-RPC 2.0 request object")


def _internal_error(what: str, log_traceback: bool = True) -> dict[str, Any]:
    reference = uuid.uuid4().hex[:12]
    if log_traceback:
        log.exception("internal error %s (ref %s)", what, reference)
    else:  # jsonrpcserver has logged the traceback itself
        log.error("internal error %s (ref %s)", what, reference)
    return error_response(INTERNAL_ERROR, data={"ref": reference})


def _bind(method: RpcMethod) -> Callable[..., Any]:
    """The callable jsonrpcserver sees: validate, call, encode, map errors."""

    def call(context: Any, /, *positional: Any, **named: Any) -> Any:
        if positional:
            return Error(
                INVALID_PARAMS,
                "Invalid params: pass params by name (a JSON object)",
                {"errors": [{"field": None, "message": "params must be an object"}]},
            )
        try:
            params = method.params.model_validate(named)
        except ValidationError as error:
            fields = field_errors(error)
            detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
            return Error(INVALID_PARAMS, f"Invalid params: {detail}", {"errors": fields})
        try:
            result = method.handler(context, params)
            return Success(to_jsonable_python(result, inf_nan_mode="null"))
        except HeadscopeError as error:
            code, message, data = headscope_error(error)
            return Error(code, message, data) if data is not None else Error(code, message)
        except Exception:  # a bug: log it, tell the client only where to look
            reference = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (ref %s)", method.name, reference)
            return Error(INTERNAL_ERROR, ERRORS[INTERNAL_ERROR][0], {"ref": reference})

    call.__name__ = method.name
    return call
