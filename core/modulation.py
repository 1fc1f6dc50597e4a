"""Head-specific attention modulation towards a marked context, and steered generation.

A `Modulation` says which heads to steer and how; `items(...)` turns it into
tracing interventions for one batch of marked prompts:

- PAINT form: in the chosen heads, the pre-softmax logits z of context keys get
  `alpha * |z|` added (alpha 0 is exactly the unsteered model);
- PASTA form: the logits of every prompt key outside the context get
  `log(pasta_coefficient)` added instead, i.e. their attention is scaled down;
- optional ACT-style sink calibration (`sink_beta`): in the same heads, attention on
  sink tokens other than each prompt's first (keys receiving mean attention above
  `sink_threshold`) is scaled by beta and given to the other keys.

Steering acts on query rows after the context (the question, the answer prefix)
and on every generated token, as in PAINT's decoding-time modulation.
`generate_marked(...)` decodes greedily with a modulation active.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from . import compare
from . import tracing as T
from .errors import InvalidParamsError
from .models import ModelHandle
from .spans import MarkedPrompt, ragged_to_rows

Form = Literal["paint", "pasta"]
ALPHA_RANGE = (0.0, 4.0)


@dataclass
class Modulation:
    """Which heads to steer towards the context, and how strongly."""

    heads: T.HeadMap
    alpha: float = 0.5
    form: Form = "paint"
    pasta_coefficient: float = 0.01
    sink_beta: float | None = None
    sink_threshold: float = 0.1
    label: str = field(default="modulated", compare=False)

    def validate(self, handle: ModelHandle) -> None:
        low, high = ALPHA_RANGE
        if not (low <= self.alpha <= high) or math.isnan(self.alpha):
            raise InvalidParamsError(f"alpha {self.alpha} is out of range {low}..{high}")
        if self.form not in ("paint", "pasta"):
            raise InvalidParamsError(f"unknown modulation form {self.form!r} (paint or pasta)")
        if not 0.0 < self.pasta_coefficient <= 1.0:
            raise InvalidParamsError(
                f"pasta_coefficient {self.pasta_coefficient} is out of range (0, 1]"
            )
        if self.sink_beta is not None and not 0.0 < self.sink_beta <= 1.0:
            raise InvalidParamsError(f"sink_beta {self.sink_beta} is out of range (0, 1]")
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
        if self.form == "paint":
            keys = ragged_to_rows([m.positions for m in marked])
            steer = T.AttentionBias(self.heads, keys, self.alpha, "scaled", query_from)
        else:
            all_context = [i for i, m in enumerate(marked) if not m.others()]
            if all_context:
                raise InvalidParamsError(
                    f"prompt {all_context[0]} is all context: PASTA has nothing to down-weight"
                )
            keys = ragged_to_rows([m.others() for m in marked])
            value = math.log(self.pasta_coefficient)
            steer = T.AttentionBias(self.heads, keys, value, "add", query_from)
        items: list[T.Intervention] = [steer]
        if self.sink_beta is not None:
            sinks = prompt_sinks(handle, batch, marked, sorted(self.heads), self.sink_threshold)
            items.append(T.SinkCalibration(self.heads, sinks, self.sink_beta, query_from))
        return items

    def describe(self) -> dict:
        return {
            "label": self.label,
            "form": self.form,
            "alpha": self.alpha,
            "pasta_coefficient": self.pasta_coefficient if self.form == "pasta" else None,
            "sink_beta": self.sink_beta,
            "heads": [[layer, head] for layer, hs in self.heads.items() for head in hs],
        }


def find_sinks(
    handle: ModelHandle, batch: T.Batch, layers: Sequence[int], threshold: float
) -> dict[int, torch.Tensor]:
    """Attention sinks per layer: bool [b, H, width], keys whose mean attention from
    later rows exceeds `threshold`, except each prompt's first token (ACT keeps it)."""
    result = T.forward(handle, batch, [T.AttentionReceived(list(layers))], logits_at=None)
    first = torch.zeros(batch.size, batch.width, dtype=torch.bool)
    first[torch.arange(batch.size), torch.tensor(batch.pads)] = True
    sinks = {}
    for layer in layers:
        received = result.get("received", layer)  # [b, H, width]
        sinks[layer] = (received > threshold) & ~first[:, None, :]
    return sinks


def prompt_sinks(
    handle: ModelHandle,
    batch: T.Batch,
    marked: Sequence[MarkedPrompt],
    layers: Sequence[int],
    threshold: float,
) -> dict[int, torch.Tensor]:
    """Sinks found on the prompts alone, laid out over `batch`'s columns (whose rows
    may continue past their prompts), so scoring an answer and generating it see
    the same sinks."""
    prompts = T.make_batch(handle, [list(m.ids) for m in marked])
    found = find_sinks(handle, prompts, layers, threshold)
    sinks = {}
    for layer, mask in found.items():
        out = torch.zeros(batch.size, mask.shape[1], batch.width, dtype=torch.bool)
        for row, m in enumerate(marked):
            src, dst = prompts.pads[row], batch.pads[row]
            out[row, :, dst : dst + len(m)] = mask[row, :, src : src + len(m)]
        sinks[layer] = out
    return sinks


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


def select_heads(
    scores: dict[tuple[int, int], float],
    top_k: int | None = None,
    threshold: float | None = None,
    layers: Sequence[int] | None = None,
) -> T.HeadMap:
    """Heads by score within `layers`: the `top_k` best, or those above `threshold`."""
    if (top_k is None) == (threshold is None):
        raise InvalidParamsError("select heads by top_k or by threshold (exactly one)")
    allowed = set(layers) if layers is not None else None
    pool = {h: s for h, s in scores.items() if allowed is None or h[0] in allowed}
    rule, value = ("top", top_k) if top_k is not None else ("threshold", threshold)
    chosen = compare.select_heads(pool, rule, value)
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
