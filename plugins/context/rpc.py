"""`generate.steer`: steered generation for other tools, over JSON-RPC."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from headscope.core.analysis import FindingsReader
from headscope.core.models import DEFAULT_MODEL
from headscope.core.rpc import RpcMethod
from headscope.core.rpc import errors as codes

from .steering import SteeringRequest, steer


class SteerParams(SteeringRequest):
    model: str = Field(DEFAULT_MODEL, description="Model name (see models.list).")


class SteeredGeneration(BaseModel):
    prompt: str
    context_positions: list[int] = Field(description="Token positions of the marked spans.")
    baseline: str = Field(description="Continuation without steering.")
    steered: str = Field(description="Continuation with steering.")
    baseline_tokens: list[int]
    steered_tokens: list[int]
    modulation: dict[str, Any] = Field(description="Form, strength and the steered heads.")


def generate_steer(service: Any, params: SteerParams) -> dict[str, Any]:
    name = service.registry.models.resolve(params.model).name
    handle = service.workers.load(name)
    request = SteeringRequest.model_validate(params.model_dump(exclude={"model"}))
    findings = FindingsReader(service.store, service.registry)
    return steer(handle, request, findings).as_dict()


GENERATE_STEER = RpcMethod(
    "generate.steer",
    SteerParams,
    generate_steer,
    SteeredGeneration,
    "Generate for a prompt with and without attention steering towards marked spans.",
    "Answers when both continuations are done (seconds on a small model; it waits "
    "for the model while a run on it holds the model). Heads: an explicit list, "
    "all heads of min_layer..max_layer (the default), or the top heads of an "
    "earlier run (from_run).",
    errors=(codes.UNKNOWN_MODEL, codes.MODEL_UNAVAILABLE, codes.RUN_NOT_FOUND),
)
