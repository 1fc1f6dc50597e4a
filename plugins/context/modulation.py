"""Head-specific attention modulation towards a marked context, and steered generation.

A `Modulation` says which heads to steer and how; `items(...)` turns it into
tracing interventions for one batch of marked prompts:

- PAINT form: in the chosen heads, the pre-softmax logits z of context keys get
  `alpha * |z|` added (alpha 0 is exactly the unsteered model);
- PASTA form: the logits of every prompt key outside the context get
  `log(pasta_coefficient)` added instead, i.e. their attention is scaled down;
- optional ACT sink calibration (`sink_beta`): in the same heads, attention on
  each head's sinks but its first (keys receiving mean attention above
  `sink_threshold`, found by `core.tracing.find_sinks`, the detection the
  `attention-sinks` analysis uses) is scaled by beta and given to the other keys.

Steering acts on query rows after the context (the question, the answer prefix)
and on every generated token, as in PAINT's decoding-time modulation.
`generate_marked(...)` decodes greedily with a modulation active.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticSerializationError, to_json

from headscope.core import compare
from headscope.core import tracing as T
from headscope.core.errors import InvalidParamsError, validation_error
from headscope.core.models import ModelHandle
from headscope.core.spans import MarkedPrompt, ragged_to_rows

Form = Literal["paint", "pasta"]


class SteeringSettings(BaseModel):
    """How chosen heads are steered: the one definition behind attention-modulation's
    params, the `steer` command and `generate.steer`."""

    model_config = ConfigDict(extra="forbid")

    min_layer: int = Field(2, ge=0, description="First layer that may be steered.")
    max_layer: int | None = Field(None, ge=0, description="Last layer (default: the last).")
    alpha: float = Field(
        0.5, ge=0.0, le=4.0, description="PAINT strength: context logits z += alpha * |z|."
    )
    form: Form = Field("paint", description="paint (amplify context) or pasta (damp the rest).")
    pasta_coefficient: float = Field(
        0.01, gt=0, le=1, description="PASTA: non-context attention is scaled by this."
    )
    sink_beta: float | None = Field(
        None, gt=0, le=1, description="ACT sink calibration: scale sink attention by this."
    )
    sink_threshold: float = Field(0.1, gt=0, lt=1, description="ACT sink threshold.")

    @model_validator(mode="after")
    def _layer_order(self):
        if self.max_layer is not None and self.max_layer < self.min_layer:
            raise ValueError(f"max_layer {self.max_layer} is below min_layer {self.min_layer}")
        return self

    @classmethod
    def parse(cls, values: dict[str, Any], what: str = "invalid steering settings"):
        """Validate raw values strictly, as the JSON they arrive as (as analysis params
        are): "3" and true are not numbers, a JSON list is a tuple. Errors name each
        bad field."""
        try:
            raw = to_json(dict(values), inf_nan_mode="constants")
        except PydanticSerializationError as error:
            raise InvalidParamsError(f"{what}: not JSON values: {error}") from None
        try:
            return cls.model_validate_json(raw, strict=True)
        except ValidationError as error:
            raise validation_error(error, what, "(request)") from None

    def settings(self) -> SteeringSettings:
        """Just the steering settings of a model that extends them."""
        return SteeringSettings.model_validate(
            {name: getattr(self, name) for name in SteeringSettings.model_fields}
        )


class Modulation:
    """Which heads to steer towards the context, and how (`SteeringSettings`).

    `Modulation(heads, alpha=0.8)` checks the settings as the params would.
    """

    def __init__(
        self,
        heads: T.HeadMap,
        settings: SteeringSettings | None = None,
        label: str = "modulated",
        **values: Any,
    ):
        if settings is not None and values:
            raise TypeError("give settings or keyword values, not both")
        self.heads = heads
        self.settings = settings if settings is not None else SteeringSettings.parse(values)
        self.label = label

    def validate(self, handle: ModelHandle) -> None:
        """The heads exist in this model (the settings were checked when made)."""
        if not self.heads:
            raise InvalidParamsError("no heads selected to modulate")
        T.check_heads(handle, self.heads)

    @property
    def n_heads(self) -> int:
        return sum(len(hs) for hs in self.heads.values())

    def items(
        self, handle: ModelHandle, batch: T.Batch, marked: Sequence[MarkedPrompt]
    ) -> list[T.Intervention]:
        """Interventions for `batch`, whose rows start with the `marked` prompts
        (a row may continue past its prompt, e.g. with an answer to score)."""
        if len(marked) != batch.size:
            raise InvalidParamsError(f"{len(marked)} marked prompts for {batch.size} rows")
        # the first row after the context (the last prompt row if the context ends it)
        query_from = [min(m.end, len(m) - 1) for m in marked]
        settings = self.settings
        if settings.form == "paint":
            keys = ragged_to_rows([m.positions for m in marked])
            steer = T.AttentionBias(self.heads, keys, settings.alpha, "scaled", query_from)
        else:
            all_context = [i for i, m in enumerate(marked) if not m.others()]
            if all_context:
                raise InvalidParamsError(
                    f"prompt {all_context[0]} is all context: PASTA has nothing to down-weight"
                )
            keys = ragged_to_rows([m.others() for m in marked])
            value = math.log(settings.pasta_coefficient)
            steer = T.AttentionBias(self.heads, keys, value, "add", query_from)
        items: list[T.Intervention] = [steer]
        if settings.sink_beta is not None:
            prompts = [m.ids for m in marked]
            layers = sorted(self.heads)
            sinks = T.prompt_sinks(handle, batch, prompts, layers, settings.sink_threshold)
            items.append(T.SinkCalibration(self.heads, sinks, settings.sink_beta, query_from))
        return items

    def describe(self) -> dict:
        settings = self.settings
        return {
            "label": self.label,
            "form": settings.form,
            "alpha": settings.alpha,
            "pasta_coefficient": settings.pasta_coefficient if settings.form == "pasta" else None,
            "sink_beta": settings.sink_beta,
            "heads": [[layer, head] for layer, hs in self.heads.items() for head in hs],
        }


def layer_range(handle: ModelHandle, min_layer: int, max_layer: int | None) -> list[int]:
    """Layers min_layer..max_layer (default: the last), checked against the model."""
    top = handle.n_layers - 1
    last = top if max_layer is None else max_layer
    if not 0 <= min_layer <= top:
        raise InvalidParamsError(f"min_layer {min_layer} out of range 0..{top}")
    if not 0 <= last <= top:
        raise InvalidParamsError(f"max_layer {last} out of range 0..{top}")
    if min_layer > last:
        raise InvalidParamsError(f"min_layer {min_layer} is above max_layer {last}")
    return list(range(min_layer, last + 1))


def layer_heads(handle: ModelHandle, layers: Sequence[int] | None = None) -> T.HeadMap:
    """Every head of `layers` (default: all layers)."""
    chosen = range(handle.n_layers) if layers is None else layers
    return T.head_map({layer: range(handle.n_heads) for layer in chosen})


def heads_by_score(
    scores: dict[tuple[int, int], float], rule: str, value: float, layers: Sequence[int]
) -> T.HeadMap:
    """`compare.select_heads` within `layers`, as a head map; an empty choice is an error."""
    chosen = compare.select_heads(scores, rule, value, layers)
    if not chosen:
        raise InvalidParamsError("the head selection is empty")
    return T.head_map(sorted(chosen))


def generate_marked(
    handle: ModelHandle,
    marked: Sequence[MarkedPrompt],
    modulation: Modulation | None,
    max_new_tokens: int,
    stop_at_newline: bool = False,
    items: Sequence[T.Intervention] = (),
) -> T.GenerationResult:
    """Greedy continuations of marked prompts, steered when `modulation` is given."""
    batch = T.make_batch(handle, [list(m.ids) for m in marked])
    steering = modulation.items(handle, batch, marked) if modulation is not None else []
    stops = T.stop_token_ids(handle, stop_at_newline=stop_at_newline)
    return T.generate(handle, batch, max_new_tokens, [*steering, *items], stop_ids=stops)
