"""Error codes the service returns, and which exception maps to which code.

Standard JSON-RPC codes cover malformed messages and bad params; the application
codes below let a client react to a specific failure without parsing messages.
Every error a client sees comes from a `HeadscopeError` (a message written for
users) or is a bare "Internal error" whose details are only logged.
"""

from __future__ import annotations

from typing import Any

from ..errors import (
    HeadscopeError,
    IntegrityError,
    InvalidParamsError,
    ModelUnavailableError,
    RunFailedError,
    RunNotFinishedError,
    RunNotFoundError,
    UnknownAnalysisError,
    UnknownModelError,
)
from ..workers import QueueFullError, ShuttingDownError

# JSON-RPC 2.0
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

# headscope
REQUEST_FAILED = -32000
UNKNOWN_MODEL = -32001
UNKNOWN_ANALYSIS = -32002
RUN_NOT_FOUND = -32003
RUN_FAILED = -32004
RUN_NOT_FINISHED = -32005
MODEL_UNAVAILABLE = -32006
MODEL_BUSY = -32007
SHUTTING_DOWN = -32008
QUEUE_FULL = -32009
UNAUTHORIZED = -32010
REQUEST_TOO_LARGE = -32011
FORBIDDEN = -32012

#: code -> (short message, when it happens); the documented list (docs/rpc.md)
ERRORS: dict[int, tuple[str, str]] = {
    PARSE_ERROR: ("Parse error", "the body is not valid JSON (or not UTF-8)"),
    INVALID_REQUEST: ("Invalid request", "not a JSON-RPC 2.0 request object, or an empty batch"),
    METHOD_NOT_FOUND: ("Method not found", "no method with this name"),
    INVALID_PARAMS: ("Invalid params", "params failed validation; `data.errors` lists each field"),
    INTERNAL_ERROR: ("Internal error", "a bug; the server log has the traceback under `data.ref`"),
    REQUEST_FAILED: ("Request failed", "the request cannot be served; the message says why"),
    UNKNOWN_MODEL: ("Unknown model", "the model name is not registered, a path or a hub id"),
    UNKNOWN_ANALYSIS: ("Unknown analysis", "no installed plugin provides this analysis"),
    RUN_NOT_FOUND: ("Run not found", "no stored run has this id"),
    RUN_FAILED: ("Run failed", "the run failed, was cancelled or interrupted: it has no results"),
    RUN_NOT_FINISHED: ("Run not finished", "the run is queued or running: results come later"),
    MODEL_UNAVAILABLE: ("Model unavailable", "the model is known but cannot be obtained here"),
    MODEL_BUSY: ("Model busy", "runs are queued or running on the model"),
    SHUTTING_DOWN: ("Shutting down", "the service is stopping and takes no new runs"),
    QUEUE_FULL: ("Queue full", "as many runs as the service allows are queued; nothing was stored"),
    UNAUTHORIZED: ("Unauthorized", "missing or wrong bearer token (HTTP 401)"),
    REQUEST_TOO_LARGE: ("Request too large", "the message exceeds the size limit (HTTP 413)"),
    FORBIDDEN: (
        "Forbidden",
        "the token lacks the scope the method needs; `data.required` names it",
    ),
}


class ModelBusyError(HeadscopeError):
    """A model cannot be unloaded while runs use it."""


_CODES: tuple[tuple[type[HeadscopeError], int], ...] = (
    (InvalidParamsError, INVALID_PARAMS),
    (UnknownModelError, UNKNOWN_MODEL),
    (UnknownAnalysisError, UNKNOWN_ANALYSIS),
    (RunNotFoundError, RUN_NOT_FOUND),
    (RunFailedError, RUN_FAILED),
    (RunNotFinishedError, RUN_NOT_FINISHED),
    (ModelUnavailableError, MODEL_UNAVAILABLE),
    (IntegrityError, MODEL_UNAVAILABLE),
    (ModelBusyError, MODEL_BUSY),
    (ShuttingDownError, SHUTTING_DOWN),
    (QueueFullError, QUEUE_FULL),
)


def error_object(error: HeadscopeError) -> tuple[int, str, Any]:
    """(code, message, data) for a user-facing error; the message is the error's own."""
    code = next((code for cls, code in _CODES if isinstance(error, cls)), REQUEST_FAILED)
    data: Any = getattr(error, "data", None)
    if isinstance(error, InvalidParamsError):
        data = {"errors": error.errors or [{"field": None, "message": str(error)}]}
    return code, str(error), data
