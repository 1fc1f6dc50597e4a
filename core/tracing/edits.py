"""Interventions that change what the model computes: masking, ablating, patching
and steering heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .. import attention as attn_math
from ..errors import InvalidParamsError
from .batch import Batch, HeadMap, Steps, check_heads, head_map
from .sites import AttentionCall, Intervention


@dataclass
class UniformAttention(Intervention):
    """Zero the query of chosen heads: equal logits, i.e. uniform attention over the
    positions the mask allows. This is the head masking of the retrieval-head paper.

    `heads` is one head map for every row, or one per row of the batch (masking
    different heads in different rows of one pass; an empty map leaves a row alone).
    """

    heads: HeadMap | Sequence[HeadMap]

    def _per_row(self) -> list[HeadMap] | None:
        return None if isinstance(self.heads, Mapping) else list(self.heads)

    def attention_layers(self):
        rows = self._per_row()
        return set(self.heads) if rows is None else {layer for row in rows for layer in row}

    def validate(self, handle, batch):
        rows = self._per_row()
        if rows is not None and len(rows) != batch.size:
            raise InvalidParamsError(
                f"uniform attention gives {len(rows)} head maps for a batch of {batch.size}"
            )
        for heads in [self.heads] if rows is None else rows:
            check_heads(handle, heads)

    def at_attention(self, call, record):
        rows = self._per_row()
        if rows is None:
            heads = self.heads.get(call.layer)
            if heads:
                call.query[:, list(heads)] = 0
            return
        for row, heads in enumerate(rows):
            chosen = heads.get(call.layer)
            if chosen:
                call.query[row, list(chosen)] = 0


@dataclass
class HeadAblation(Intervention):
    """Replace chosen heads' outputs by zero or by their mean over a reference batch.

    `means` maps layer -> [H, hd] (see `mean_head_outputs`); required for mode "mean".
    """

    heads: HeadMap
    mode: Literal["zero", "mean"] = "zero"
    means: dict[int, torch.Tensor] | None = None
    positions: Sequence[int] | None = None

    def output_layers(self):
        return set(self.heads)

    def validate(self, handle, batch):
        check_heads(handle, self.heads)
        if self.mode not in ("zero", "mean"):
            raise InvalidParamsError(f"unknown ablation mode {self.mode!r} (zero or mean)")
        if self.mode == "mean":
            missing = [layer for layer in self.heads if not self.means or layer not in self.means]
            if missing:
                raise InvalidParamsError(f"mean ablation needs means for layers {missing}")
        if self.positions is not None:
            batch.absolute(self.positions)

    def at_head_output(self, site, record):
        heads = self.heads.get(site.layer)
        if not heads or (self.positions is not None and site.step > 0):
            return
        value = site.edit()
        cols = site.columns(self.positions)
        for head in heads:
            replacement = 0.0 if self.mode == "zero" else self.means[site.layer][head].to(value)
            if cols is None:
                value[:, :, head] = replacement
            else:
                for row in range(value.shape[0]):
                    value[row, cols[row], head] = replacement


@dataclass
class HeadPatch(Intervention):
    """Replace chosen heads' outputs with those recorded on another input.

    `source` maps layer -> [b, s, H, hd] as returned by `HeadOutputs` with all
    positions, for a batch of the same shape. Applies at the prefill only.
    `positions` limits the patch to some prompt positions (default: all).
    """

    heads: HeadMap
    source: dict[int, torch.Tensor]
    positions: Sequence[int] | None = None
    steps: Steps = field(default="prefill", kw_only=True)

    def output_layers(self):
        return set(self.heads)

    def validate(self, handle, batch):
        check_heads(handle, self.heads)
        missing = [layer for layer in self.heads if layer not in self.source]
        if missing:
            raise InvalidParamsError(f"patch source lacks layers {missing}")
        for layer in self.heads:
            if tuple(self.source[layer].shape[:2]) != (batch.size, batch.width):
                raise InvalidParamsError(
                    f"patch source for layer {layer} has shape "
                    f"{tuple(self.source[layer].shape[:2])}, the batch is "
                    f"{(batch.size, batch.width)}; patch between prompts of equal length"
                )
        if self.positions is not None:
            batch.absolute(self.positions)

    def at_head_output(self, site, record):
        heads = self.heads.get(site.layer)
        if not heads:
            return
        source = self.source[site.layer].to(site.value)
        if source.shape[:2] != site.value.shape[:2]:
            raise InvalidParamsError(
                f"patch source shape {tuple(source.shape[:2])} does not match the input "
                f"{tuple(site.value.shape[:2])}; patch between prompts of equal length"
            )
        value = site.edit()
        cols = site.columns(self.positions)
        index = list(heads)
        if cols is None:
            value[:, :, index] = source[:, :, index]
        else:
            for row in range(value.shape[0]):
                value[row, cols[row][:, None], index] = source[row, cols[row][:, None], index]


@dataclass
class RowHeadPatch(Intervention):
    """Patch different heads in different rows: many patched copies of a batch in one pass.

    Row r of the batch gets heads `row_heads[r]` (a list of (layer, head); empty
    leaves the row untouched) replaced with row `source_rows[r]` of `source`
    (layer -> [n, s, H, hd], as `HeadOutputs` records with all positions, for
    prompts of the batch's width). Prefill only.
    """

    row_heads: Sequence[Sequence[tuple[int, int]]]
    source: dict[int, torch.Tensor]
    source_rows: Sequence[int]
    steps: Steps = field(default="prefill", kw_only=True)

    def output_layers(self):
        return {int(layer) for heads in self.row_heads for layer, _ in heads}

    def validate(self, handle, batch):
        if len(self.row_heads) != batch.size or len(self.source_rows) != batch.size:
            raise InvalidParamsError(
                f"row patch gives {len(self.row_heads)} head lists and "
                f"{len(self.source_rows)} source rows for a batch of {batch.size}"
            )
        for heads in self.row_heads:
            check_heads(handle, head_map(heads))
        for layer in self.output_layers():
            if layer not in self.source:
                raise InvalidParamsError(f"patch source lacks layer {layer}")
            n, width = self.source[layer].shape[:2]
            if width != batch.width:
                raise InvalidParamsError(
                    f"patch source for layer {layer} is {width} tokens wide, the batch "
                    f"{batch.width}; patch between prompts of equal length"
                )
            if not all(0 <= int(r) < n for r in self.source_rows):
                raise InvalidParamsError(f"source_rows must lie in 0..{n - 1}")

    def at_head_output(self, site, record):
        picks = [
            (row, int(head), int(self.source_rows[row]))
            for row, heads in enumerate(self.row_heads)
            for layer, head in heads
            if int(layer) == site.layer
        ]
        if not picks:
            return
        value = site.edit()
        rows, heads, sources = (
            torch.tensor(column, device=value.device) for column in zip(*picks, strict=True)
        )
        value[rows, :, heads] = self.source[site.layer].to(value)[sources, :, heads]


@dataclass
class AttentionBias(Intervention):
    """Add to the pre-softmax logits of chosen heads at chosen key positions.

    mode "add": logits += value. mode "scaled": logits += value * |logits| (PAINT).
    `keys` are prompt positions (one list for all rows, or one per row).
    `query_from`: only query rows at prompt position >= query_from (and all decode
    steps) are changed; None changes every row. One position for every row, or
    one per row.
    """

    heads: HeadMap
    keys: Sequence[int] | Sequence[Sequence[int]]
    value: float
    mode: Literal["add", "scaled"] = "add"
    query_from: int | Sequence[int] | None = None

    def attention_layers(self):
        return set(self.heads)

    def validate(self, handle, batch):
        check_heads(handle, self.heads)
        if self.mode not in ("add", "scaled"):
            raise InvalidParamsError(f"unknown bias mode {self.mode!r} (add or scaled)")
        batch.absolute(self.keys)
        if self.query_from is not None:
            query_start_columns(batch, self.query_from)

    def _key_mask(self, call: AttentionCall) -> torch.Tensor:
        cols = call.plan.batch.absolute(self.keys).to(call.device) - call.key_offset  # [b, n]
        mask = torch.zeros(cols.shape[0], call.k_len + 1, dtype=torch.bool, device=call.device)
        # keys that fell out of a sliding window land in a spare column, dropped below
        mask.scatter_(1, cols.where(cols >= 0, call.k_len), True)
        return mask[:, : call.k_len]  # [b, k]

    def _row_mask(self, call: AttentionCall) -> torch.Tensor:
        return query_rows_mask(call, self.query_from)

    def at_attention(self, call, record):
        heads = self.heads.get(call.layer)
        if not heads:
            return
        n_heads = call.query.shape[1]
        where = self._row_mask(call)[:, :, None] & self._key_mask(call)[:, None, :]  # [b,q,k]
        head_sel = torch.zeros(n_heads, dtype=torch.bool, device=call.device)
        head_sel[list(heads)] = True
        where = where[:, None] & head_sel[None, :, None, None]  # [b, H, q, k]
        if self.mode == "add":
            bias = where.float() * float(self.value)
        else:
            logits = attn_math.attention_logits(
                call.query.detach(), call.key.detach(), call.scaling, softcap=call.softcap
            )
            bias = torch.where(where, self.value * logits.abs(), logits.new_zeros(()))
        call.add_bias(bias)


def query_start_columns(batch: Batch, query_from: int | Sequence[int]) -> torch.Tensor:
    """Padded column [b] of the first steered query row: one prompt position for
    every row, or one per row."""
    if isinstance(query_from, int):
        return batch.absolute([query_from])[:, 0]
    starts = [int(p) for p in query_from]
    if len(starts) != batch.size:
        raise InvalidParamsError(
            f"query_from gives {len(starts)} positions for a batch of {batch.size} prompts"
        )
    return batch.absolute([[p] for p in starts])[:, 0]


def query_rows_mask(call: AttentionCall, query_from: int | Sequence[int] | None) -> torch.Tensor:
    """[b, q] bool: the call's query rows at or after `query_from` (decode rows always)."""
    b, q_len = call.query.shape[0], call.q_len
    if call.step > 0 or query_from is None:
        return torch.ones(b, q_len, dtype=torch.bool, device=call.device)
    start = query_start_columns(call.plan.batch, query_from).to(call.device)  # [b]
    return torch.arange(q_len, device=call.device)[None, :] >= start[:, None]


@dataclass
class SinkCalibration(Intervention):
    """ACT-style attention-sink calibration in chosen heads.

    In each steered query row, attention on the row's sink keys is scaled by `beta`
    and the removed mass goes to every other key in proportion to its attention, so
    the row still sums to 1. Written as a logit bias computed from the row's
    probabilities (after any bias added before it): with S the row's mass on its
    sinks, sink logits get log(beta * (1 - S) / (1 - beta * S)).

    `sinks` maps layer -> bool [b, H, width] over padded prompt columns (see
    `AttentionReceived`, as the context family's `find_sinks` does); generated tokens are
    never sinks. `query_from` limits the steered prefill rows as in `AttentionBias`.
    """

    heads: HeadMap
    sinks: Mapping[int, torch.Tensor]
    beta: float = 0.4
    query_from: int | Sequence[int] | None = None

    def attention_layers(self):
        return set(self.heads)

    def validate(self, handle, batch):
        check_heads(handle, self.heads)
        if not 0.0 < self.beta <= 1.0:
            raise InvalidParamsError(f"sink beta {self.beta} is outside (0, 1]")
        for layer in self.heads:
            sinks = self.sinks.get(layer)
            expected = (batch.size, handle.n_heads, batch.width)
            if sinks is None or tuple(sinks.shape) != expected:
                shape = None if sinks is None else tuple(sinks.shape)
                raise InvalidParamsError(
                    f"sinks for layer {layer} have shape {shape}, expected {expected}"
                )
        if self.query_from is not None:
            query_start_columns(batch, self.query_from)

    def at_attention(self, call, record):
        heads = list(self.heads.get(call.layer, ()))
        if not heads:
            return
        b, width = call.query.shape[0], call.plan.batch.width
        probs = call.probabilities(heads=heads)
        sinks = torch.zeros(b, len(heads), call.total_len, dtype=torch.bool, device=call.device)
        sinks[..., :width] = self.sinks[call.layer][:, heads].bool().to(call.device)
        sinks = sinks[..., call.key_offset :]  # cache columns [b, h, k]
        mass = (probs * sinks[:, :, None]).sum(-1, keepdim=True)  # [b, h, q, 1]
        eps = 1e-6
        shift = torch.log(
            self.beta * (1 - mass).clamp(min=eps) / (1 - self.beta * mass).clamp(min=eps)
        )
        steered = query_rows_mask(call, self.query_from)[:, None, :, None]  # [b, 1, q, 1]
        bias = torch.zeros(b, call.query.shape[1], call.q_len, call.k_len, device=call.device)
        bias[:, heads] = torch.where(sinks[:, :, None] & steered, shift, 0.0)
        call.add_bias(bias)
