"""Steered generation as a request: what the CLI's `steer` command and other tools call.

A `SteeringRequest` is plain JSON-friendly data (prompt, spans, heads, strength);
`steer(handle, request, findings)` validates it against the model, generates the
baseline and the steered continuation, and returns both side by side. Heads come
from an explicit list, every head of a layer range, or the top heads of an earlier
run (`from_run`, read through `findings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from headscope.core.errors import InvalidParamsError
from headscope.core.models import ModelHandle
from headscope.core.spans import CharSpan, MarkedPrompt, Span, TokenSet, TokenSpan, find_text, mark
from headscope.core.tracing import HeadMap, head_map

from .modulation import (
    Modulation,
    SteeringSettings,
    generate_marked,
    heads_by_score,
    layer_heads,
    layer_range,
)


class SpanSpec(BaseModel):
    """One marked span: exactly one of text, chars, tokens or positions."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="Mark the first occurrence of this text.")
    chars: tuple[int, int] | None = Field(None, description="Characters [start, end).")
    tokens: tuple[int, int] | None = Field(None, description="Token positions [start, end).")
    positions: list[int] | None = Field(None, description="Any token positions.")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [
            k for k in ("text", "chars", "tokens", "positions") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError("give exactly one of text, chars, tokens or positions per span")
        return self

    def to_span(self, prompt: str) -> Span:
        if self.text is not None:
            return find_text(prompt, self.text)
        if self.chars is not None:
            return CharSpan(*self.chars)
        if self.tokens is not None:
            return TokenSpan(*self.tokens)
        return TokenSet(self.positions or [])


class SteeringRequest(SteeringSettings):
    """Generate for `prompt` with and without steering towards its marked spans."""

    prompt: str = Field(..., min_length=1)
    spans: list[SpanSpec] = Field(..., min_length=1)
    heads: list[tuple[int, int]] | Literal["all"] | None = Field(
        None,
        description='[[layer, head], ...] or "LAYER.HEAD,LAYER.HEAD", or all heads of '
        "the layer range (all, the default).",
    )
    from_run: int | None = Field(None, description="Use the top heads of this run.")
    metric: str | None = Field(None, description="Head metric of from_run (default: primary).")
    top_k: int | None = Field(None, ge=1, description="Heads taken from from_run (default 20).")
    threshold: float | None = Field(None, description="Or: from_run heads above this score.")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Tokens to generate.")
    stop_at_newline: bool = Field(False, description="Stop each continuation at a newline.")

    @field_validator("heads", mode="before")
    @classmethod
    def _head_list(cls, value: Any) -> Any:
        """`LAYER.HEAD,LAYER.HEAD` (e.g. `17.3,18.6`), as written on the command line."""
        if isinstance(value, float):  # `-p heads=9.0` reads as a number
            raise ValueError(f"{value!r}: write all, LAYER.HEAD,LAYER.HEAD or [[layer, head]]")
        if isinstance(value, list):  # JSON pairs: validated strictly as tuples
            return [tuple(head) if isinstance(head, list) else head for head in value]
        if not isinstance(value, str) or value.strip() == "all":
            return value.strip() if isinstance(value, str) else value
        heads = []
        for part in value.split(","):
            layer, dot, head = part.strip().partition(".")
            if not dot or not layer.isdigit() or not head.isdigit():
                raise ValueError(f"{value!r}: write all or LAYER.HEAD,LAYER.HEAD")
            heads.append((int(layer), int(head)))
        return heads

    @model_validator(mode="after")
    def _one_head_source(self):
        if self.heads is not None and self.from_run is not None:
            raise ValueError("give heads or from_run, not both")
        if self.top_k is not None and self.threshold is not None:
            raise ValueError("give top_k or threshold, not both")
        return self

    @classmethod
    def parse(cls, values: dict[str, Any], what: str = "invalid steering request"):
        return super().parse(values, what)


@dataclass
class SteeredGeneration:
    """Baseline and steered continuations of one prompt."""

    prompt: str
    context_positions: list[int]
    baseline: str
    steered: str
    baseline_tokens: list[int]
    steered_tokens: list[int]
    modulation: dict

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_heads(handle: ModelHandle, request: SteeringRequest, findings: Any = None) -> HeadMap:
    """The request's heads: explicit, all of the layer range, or from an earlier run."""
    layers = layer_range(handle, request.min_layer, request.max_layer)
    if request.from_run is not None:
        if findings is None:
            raise InvalidParamsError("from_run needs access to the findings store")
        scores = findings.head_scores(
            request.from_run, findings.head_metric(request.from_run, request.metric)
        )
        if request.threshold is not None:
            return heads_by_score(scores, "threshold", request.threshold, layers)
        return heads_by_score(scores, "top", request.top_k or 20, layers)
    if request.heads is None or request.heads == "all":
        return layer_heads(handle, layers)
    return head_map(request.heads)


def marked_prompt(handle: ModelHandle, request: SteeringRequest) -> MarkedPrompt:
    return mark(handle, request.prompt, [s.to_span(request.prompt) for s in request.spans])


def steer(handle: ModelHandle, request: SteeringRequest, findings: Any = None) -> SteeredGeneration:
    """Generate for the request's prompt without and with its modulation."""
    marked = marked_prompt(handle, request)
    modulation = Modulation(resolve_heads(handle, request, findings), request.settings())
    modulation.validate(handle)
    handle.check_length(len(marked) + request.max_new_tokens, "prompt plus generated tokens")
    runs = [
        generate_marked(handle, [marked], setting, request.max_new_tokens, request.stop_at_newline)
        for setting in (None, modulation)
    ]
    return SteeredGeneration(
        prompt=request.prompt,
        context_positions=list(marked.positions),
        baseline=runs[0].text(handle),
        steered=runs[1].text(handle),
        baseline_tokens=runs[0].tokens[0],
        steered_tokens=runs[1].tokens[0],
        modulation=modulation.describe(),
    )
