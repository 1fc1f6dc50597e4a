"""Tracing primitives: read and change individual attention heads through nnsight.

Everything here runs as one nnsight trace (a forward pass) or one traced greedy
generation, under the model's lock. What happens inside is described by small
objects that act at two sites per layer (see `core.architectures`):

- at the **attention call** (query/key after rotary, the mask): `UniformAttention`,
  `AttentionBias` (steering) and `AttentionRows` (rows computed from q and k for
  chosen query positions, never the full [heads, seq, seq] map);
- at the **head-output site** (input of the output projection): `HeadOutputs`
  (capture), `HeadAblation` (zero or mean) and `HeadPatch` (from another input).

They compose: `forward(handle, batch, [HeadAblation(...), AttentionRows(...)])`
masks heads and reads attention rows in one pass; `generate(...)` applies the same
objects at the prefill and at every decode step. Edits run before reads at each
site, so captures see what the model actually computed.

Positions are given per prompt: `p >= 0` counts from the prompt's first token,
`p < 0` from its last (`-1` is the last prompt token). Batches are left-padded.

The submodules, each importing only those before it:

- `batch`: `Batch`, `make_batch` and the head and layer selections (`head_map`);
- `sites`: the two sites (`AttentionCall`, `HeadOutputSite`), the `Intervention`
  contract and the `Plan` that visits the sites in forward order;
- `edits`: interventions that change the model (ablation, patching, steering);
- `reads`: interventions that only read (attention rows and scores, head outputs);
- `run`: `forward`, `generate` and what they return;
- `sinks`: attention sinks as ACT finds them (`find_sinks`, `prompt_sinks`), for
  `SinkCalibration`;
- `streaming`: `StreamingHeads`, KV heads that keep only sink tokens and a recent
  window (how a KV-cache plan is applied).

Import from this package; the split is not part of the interface.
"""

from __future__ import annotations

from .batch import Batch, HeadMap, Steps, check_heads, check_layers, head_map, make_batch
from .edits import (
    AttentionBias,
    HeadAblation,
    HeadPatch,
    RowHeadPatch,
    SinkCalibration,
    UniformAttention,
    query_rows_mask,
    query_start_columns,
)
from .reads import AttentionPatternScores, AttentionReceived, AttentionRows, HeadOutputs
from .run import (
    ForwardResult,
    GenerationResult,
    forward,
    generate,
    mean_head_outputs,
    newline_token_ids,
    on_cpu,
    on_model_device,
    stop_token_ids,
    trace_kwargs,
)
from .sinks import find_sinks, prompt_sinks, sink_mask
from .sites import AttentionCall, HeadOutputSite, Intervention, Plan
from .streaming import StreamingHeads

__all__ = [
    "AttentionBias",
    "AttentionCall",
    "AttentionPatternScores",
    "AttentionReceived",
    "AttentionRows",
    "Batch",
    "ForwardResult",
    "GenerationResult",
    "HeadAblation",
    "HeadMap",
    "HeadOutputSite",
    "HeadOutputs",
    "HeadPatch",
    "Intervention",
    "Plan",
    "RowHeadPatch",
    "SinkCalibration",
    "Steps",
    "StreamingHeads",
    "UniformAttention",
    "check_heads",
    "check_layers",
    "find_sinks",
    "forward",
    "generate",
    "head_map",
    "make_batch",
    "mean_head_outputs",
    "newline_token_ids",
    "on_cpu",
    "on_model_device",
    "prompt_sinks",
    "query_rows_mask",
    "query_start_columns",
    "sink_mask",
    "stop_token_ids",
    "trace_kwargs",
]
