"""Interventions that only read: attention rows and scores, attention received,
per-head outputs. They run after every edit at the same site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .. import attention as attn_math
from ..errors import InvalidParamsError
from .batch import Steps, check_layers
from .sites import Intervention


@dataclass
class AttentionReceived(Intervention):
    """Mean attention each prompt key receives from later query rows (prefill).

    Records `(name, layer)` -> [b, H, width] over padded columns: for key j, the mean
    over real query rows i > j of attention(i, j); 0 where no later row exists.
    Keys receiving much more than their share are attention sinks (ACT).
    """

    layers: Sequence[int]
    name: str = "received"
    steps: Steps = field(default="prefill", kw_only=True)
    reads = True

    def attention_layers(self):
        return set(self.layers)

    def validate(self, handle, batch):
        check_layers(handle, self.layers)

    def at_attention(self, call, record):
        batch = call.plan.batch
        probs = call.probabilities()  # [b, H, s, s]
        ones = torch.ones(call.q_len, call.k_len, dtype=torch.bool, device=call.device)
        later = torch.tril(ones, diagonal=-1)
        counted = later[None] & batch.valid().to(call.device)[:, :, None]  # [b, query, key]
        total = (probs * counted[:, None]).sum(2)  # [b, H, k]
        record[(self.name, call.layer)] = total / counted.sum(1)[:, None].clamp(min=1)


@dataclass
class HeadOutputs(Intervention):
    """Capture per-head outputs [b, n, H, hd] (input of the output projection).

    `positions` None captures every column; `reduce="mean"` averages over each row's
    real tokens instead, giving [b, H, hd].
    """

    layers: Sequence[int]
    positions: Sequence[int] | None = None
    reduce: Literal["none", "mean"] = "none"
    name: str = "heads"
    reads = True

    def output_layers(self):
        return set(self.layers)

    def validate(self, handle, batch):
        check_layers(handle, self.layers)
        if self.positions is not None:
            batch.absolute(self.positions)

    def at_head_output(self, site, record):
        value = site.value.detach()
        if self.reduce == "mean":
            if site.step == 0:
                valid = site.plan.batch.valid()[:, :, None, None].to(value)
                out = (value * valid).sum(1) / valid.sum(1)
            else:
                out = value[:, -1]
        else:
            cols = site.columns(self.positions)
            if cols is None:
                out = value.clone()
            else:
                out = torch.stack([value[row, cols[row]] for row in range(value.shape[0])])
        record[(self.name, site.layer)] = out


@dataclass
class AttentionRows(Intervention):
    """Attention rows computed from q and k for chosen query positions.

    At the prefill the rows are `positions` (prompt positions); at each decode step
    the row is the new token's. `output`: "probs" -> [b, H, n, k] softmax rows as
    eager attention computes them; "argmax" -> [b, H, n] column of each row's
    maximum; "logits" -> masked pre-softmax logits. Columns are absolute positions in
    the padded sequence (prompt columns, then generated tokens), also for layers
    whose cache keeps only a sliding window.
    """

    layers: Sequence[int]
    positions: Sequence[int] | None = (-1,)
    output: Literal["probs", "argmax", "logits"] = "probs"
    name: str = "rows"
    reads = True

    def attention_layers(self):
        return set(self.layers)

    def validate(self, handle, batch):
        check_layers(handle, self.layers)
        if self.positions is not None:
            batch.absolute(self.positions)
        if self.output not in ("probs", "argmax", "logits"):
            raise InvalidParamsError(f"unknown rows output {self.output!r}")

    def at_attention(self, call, record):
        rows = call.rows_for(self.positions)
        query, key = call.query.detach(), call.key.detach()
        logits = attn_math.attention_logits(query, key, call.scaling, rows, softcap=call.softcap)
        logits = logits + call.mask_rows(rows)
        offset = call.key_offset
        if self.output == "argmax":
            out = logits.argmax(-1) + offset
        else:
            out = torch.softmax(logits, dim=-1) if self.output == "probs" else logits
            if offset:
                # report rows over absolute positions even when the cache slides
                fill = 0.0 if self.output == "probs" else torch.finfo(out.dtype).min
                out = torch.nn.functional.pad(out, (offset, 0), value=fill)
        record[(self.name, call.layer)] = out


#: float32 attention-row elements computed at once by pattern scores (64 MiB): rows
#: are done in chunks of this size, so memory grows linearly with the context
ROW_CHUNK_ELEMENTS = 1 << 24


@dataclass
class AttentionPatternScores(AttentionRows):
    """Per-head attention mass on pattern positions, averaged over query rows.

    `patterns` maps a score name to a bool tensor over padded columns: [b, s, s]
    (query row, key column), or [b, s] for the same key columns in every row;
    `row_masks` (same names, [b, s]) says which query rows count, by default every
    real token. Records `(name, layer)` -> [b, H]: sum over counted rows of the
    row's attention on pattern keys, divided by the number of counted rows. With
    every row counted this is TransformerLens's head-detector "mul" score. Prefill
    only; rows come from q and k like `AttentionRows`, a chunk of rows at a time
    (never the full map), in float32.
    """

    patterns: Mapping[str, torch.Tensor] = field(default_factory=dict)
    row_masks: Mapping[str, torch.Tensor] | None = None
    positions: Sequence[int] | None = None
    steps: Steps = field(default="prefill", kw_only=True)

    def validate(self, handle, batch):
        super().validate(handle, batch)
        for name, pattern in self.patterns.items():
            shapes = [(batch.size, batch.width, batch.width), (batch.size, batch.width)]
            if tuple(pattern.shape) not in shapes:
                raise InvalidParamsError(
                    f"pattern {name!r} has shape {tuple(pattern.shape)}, expected "
                    f"{shapes[0]} or {shapes[1]}"
                )

    def at_attention(self, call, record):
        batch = call.plan.batch
        device = call.device  # never the default device: layers may live anywhere
        real = batch.valid().to(device)
        counted = {
            name: real if self.row_masks is None else self.row_masks[name].to(device) & real
            for name in self.patterns
        }
        b, n_heads = call.query.shape[:2]
        totals = {name: torch.zeros(b, n_heads, device=device) for name in self.patterns}
        chunk = max(1, ROW_CHUNK_ELEMENTS // max(1, b * n_heads * call.k_len))
        for start in range(0, call.q_len, chunk):
            stop = min(call.q_len, start + chunk)
            rows = torch.arange(start, stop, device=device).expand(b, stop - start)
            probs = call.probabilities(rows)  # [b, H, n, k] float32
            for name, pattern in self.patterns.items():
                keys = (
                    pattern[:, None, None] if pattern.dim() == 2 else pattern[:, None, start:stop]
                )
                mass = (probs * keys.to(probs)).sum(-1)  # [b, H, n]
                weight = counted[name][:, None, start:stop].to(probs)
                totals[name] += (mass * weight).sum(-1)
        for name, total in totals.items():
            record[(name, call.layer)] = total / counted[name].sum(-1, keepdim=True).clamp(min=1)
