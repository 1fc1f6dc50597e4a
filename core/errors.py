"""Errors a user can act on.

Every failure that comes from bad input (an unknown model, invalid parameters, a
context that does not fit) raises a subclass of `HeadscopeError`, whose message
names the problem. The CLI prints the message without a traceback and the RPC
layer maps each class to a documented error code.
"""

from __future__ import annotations


class HeadscopeError(Exception):
    """Base class for errors whose message is meant for the user."""


class UnknownModelError(HeadscopeError):
    """The model name is neither registered nor a usable path or hub id."""


class ModelUnavailableError(HeadscopeError):
    """The model is known but cannot be obtained here (no network, missing file)."""


class IntegrityError(HeadscopeError):
    """A downloaded or cached file does not match its expected checksum."""


class UnknownAnalysisError(HeadscopeError):
    """No installed plugin provides an analysis with this name."""


class UnknownTaskError(HeadscopeError):
    """No installed plugin provides a task with this name."""


class InvalidParamsError(HeadscopeError):
    """Analysis or primitive parameters failed validation."""

    def __init__(self, message: str, errors: list[dict] | None = None):
        super().__init__(message)
        self.errors = errors or []


class ContextTooLongError(InvalidParamsError):
    """A prompt is longer than the model's maximum number of positions."""


class RunNotFoundError(HeadscopeError):
    """No stored run has this id."""


class RunAlreadyFinishedError(HeadscopeError):
    """Another attempt at the run finished it first: its findings are not stored twice."""


class RunFailedError(HeadscopeError):
    """Results were asked of a run that ended without them."""

    def __init__(self, message: str, run_id: int, status: str, error: str | None):
        super().__init__(message)
        self.data = {"run_id": run_id, "status": status, "error": error}


class RunNotFinishedError(HeadscopeError):
    """Results were asked of a run that is still queued or running."""

    def __init__(self, message: str, run_id: int, status: str):
        super().__init__(message)
        self.data = {"run_id": run_id, "status": status}


class CancelledError(HeadscopeError):
    """The run was cancelled cooperatively."""


def validation_error(error, what: str, whole: str = "(params)") -> InvalidParamsError:
    """A pydantic ValidationError as an InvalidParamsError that names each bad field.

    `what` starts the message ("invalid params for NAME"); `whole` names an error
    about the object itself rather than one field.
    """
    fields = [
        {"field": ".".join(str(part) for part in item["loc"]) or whole, "message": item["msg"]}
        for item in error.errors()
    ]
    lines = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return InvalidParamsError(f"{what}: {lines}", fields)


def param_error(field: str, message: str) -> InvalidParamsError:
    """An InvalidParamsError about one named param (`field: message`)."""
    return InvalidParamsError(f"{field}: {message}", [{"field": field, "message": message}])
