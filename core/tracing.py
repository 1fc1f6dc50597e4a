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
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from . import attention as attn_math
from .errors import InvalidParamsError
from .models import ModelHandle, import_nnsight

HeadMap = dict[int, tuple[int, ...]]
Steps = Literal["all", "prefill", "decode"]


def head_map(heads: Iterable[tuple[int, int]] | Mapping[int, Iterable[int]]) -> HeadMap:
    """Normalise (layer, head) pairs or {layer: heads} into {layer: sorted heads}."""
    grouped: dict[int, set[int]] = {}
    items = heads.items() if isinstance(heads, Mapping) else None
    if items is not None:
        for layer, hs in items:
            grouped.setdefault(int(layer), set()).update(int(h) for h in hs)
    else:
        for layer, head in heads:
            grouped.setdefault(int(layer), set()).add(int(head))
    return {layer: tuple(sorted(hs)) for layer, hs in sorted(grouped.items()) if hs}


def check_layers(handle: ModelHandle, layers) -> None:
    for layer in layers:
        if not 0 <= layer < handle.n_layers:
            raise InvalidParamsError(f"layer {layer} out of range 0..{handle.n_layers - 1}")


def check_heads(handle: ModelHandle, heads: HeadMap) -> None:
    check_layers(handle, heads)
    for layer, hs in heads.items():
        for head in hs:
            if not 0 <= head < handle.n_heads:
                raise InvalidParamsError(
                    f"head {head} out of range 0..{handle.n_heads - 1} (layer {layer})"
                )


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Left-padded token ids with the per-row bookkeeping positions need."""

    input_ids: torch.Tensor  # [b, s]
    attention_mask: torch.Tensor  # [b, s]
    lengths: list[int]

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def pads(self) -> list[int]:
        return [self.width - n for n in self.lengths]

    def absolute(self, positions: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        """Per-row positions -> padded column indices [b, n].

        `positions` is one list for every row, or one list per row (same length).
        """
        per_row = positions and isinstance(positions[0], (list, tuple))
        rows = positions if per_row else [positions] * self.size
        out = []
        for row, (length, pad) in enumerate(zip(self.lengths, self.pads, strict=True)):
            cols = []
            for p in rows[row]:
                p = int(p)
                if not -length <= p < length:
                    raise InvalidParamsError(
                        f"position {p} is outside prompt {row} of length {length}"
                    )
                cols.append(pad + (p if p >= 0 else length + p))
            out.append(cols)
        return torch.tensor(out, dtype=torch.long)

    def valid(self) -> torch.Tensor:
        """[b, s] bool: True on real tokens."""
        return self.attention_mask.bool()

    def model_inputs(self) -> dict[str, torch.Tensor]:
        # Positions count real tokens only, so a left-padded row sees the same
        # positions as it would alone.
        position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": position_ids,
        }


def make_batch(handle: ModelHandle, prompts: Sequence[str] | Sequence[Sequence[int]]) -> Batch:
    """Tokenise (with the model's special tokens) and left-pad prompts; check lengths."""
    if not prompts:
        raise InvalidParamsError("no prompts given")
    rows = [handle.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    for i, row in enumerate(rows):
        if not row:
            raise InvalidParamsError(f"prompt {i} is empty")
        handle.check_length(len(row), f"prompt {i}")
    width = max(len(r) for r in rows)
    pad_id = handle.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return Batch(ids, mask, [len(r) for r in rows])


# --------------------------------------------------------------------------------------
# The two sites
# --------------------------------------------------------------------------------------
class AttentionCall:
    """The attention function's inputs at one layer and step, editable in place."""

    def __init__(self, plan: Plan, layer: int, step: int, args: tuple, kwargs: dict):
        self.plan = plan
        self.layer = layer
        self.step = step
        self.args = list(args)
        self.kwargs = kwargs
        self.mask_changed = False
        self._bias: torch.Tensor | None = None

    @property
    def query(self) -> torch.Tensor:
        return self.args[1]

    @property
    def key(self) -> torch.Tensor:
        return self.args[2]

    @property
    def mask(self) -> torch.Tensor | None:
        return self.args[4] if len(self.args) > 4 else self.kwargs.get("attention_mask")

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def k_len(self) -> int:
        return self.key.shape[2]

    @property
    def total_len(self) -> int:
        """Tokens in the sequence so far (padded prompt width plus generated)."""
        return self.plan.batch.width + self.step

    @property
    def key_offset(self) -> int:
        """Absolute position of key index 0: non-zero when a sliding-window cache
        keeps only the most recent keys."""
        return self.total_len - self.k_len

    @property
    def scaling(self) -> float:
        scaling = self.kwargs.get("scaling")
        return float(scaling) if scaling is not None else self.plan.adapter.scaling(self.layer)

    @property
    def sliding_window(self) -> int | None:
        window = self.kwargs.get("sliding_window")
        return int(window) if window else self.plan.adapter.sliding_window(self.layer)

    @property
    def softcap(self) -> float | None:
        return self.kwargs.get("softcap")

    def rows_for(self, positions: Sequence[int] | None) -> torch.Tensor:
        """Query rows [b, n] of this call for prompt positions (prefill) or the new token."""
        if self.step > 0 or positions is None:
            if self.q_len != 1 and positions is None:
                return torch.arange(self.q_len).expand(self.query.shape[0], self.q_len)
            return torch.full((self.query.shape[0], 1), self.q_len - 1, dtype=torch.long)
        return self.plan.batch.absolute(positions)

    def mask_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Additive mask (with any bias added so far) for query rows [b, n]: [b, 1|H, n, k]."""
        out = attn_math.mask_rows(
            self.mask, rows, self.q_len, self.k_len, torch.float32, self.sliding_window
        )
        if self._bias is not None:
            out = out + attn_math.select_rows(
                self._bias.float().expand(out.shape[0], -1, self.q_len, self.k_len), rows
            )
        return out

    def probabilities(
        self, rows: torch.Tensor | None = None, heads: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Attention weights [b, H|len(heads), n, k] of query rows [b, n] (default: all),
        recomputed from q and k under the mask and any bias added so far."""
        if rows is None:
            rows = torch.arange(self.q_len).expand(self.query.shape[0], self.q_len)
        logits = attn_math.attention_logits(
            self.query.detach(), self.key.detach(), self.scaling, rows, heads, self.softcap
        )
        mask = self.mask_rows(rows)
        if heads is not None and mask.shape[1] != 1:
            mask = mask[:, list(heads)]
        return torch.softmax(logits + mask, dim=-1)

    def add_bias(self, bias: torch.Tensor) -> None:
        """Add [b, H, q, k] (or broadcastable) to the pre-softmax logits."""
        self._bias = bias if self._bias is None else self._bias + bias
        self.mask_changed = True

    def commit(self) -> tuple[tuple, dict]:
        """The inputs to hand back: the mask now carries any added bias."""
        if self._bias is not None:
            dtype = self.query.dtype
            base = attn_math.additive_mask(
                self.mask, self.query.shape[0], self.q_len, self.k_len, dtype, self.sliding_window
            )
            combined = (base + self._bias.to(dtype)).contiguous()
            if len(self.args) > 4:
                self.args[4] = combined
            else:
                self.kwargs["attention_mask"] = combined
        return tuple(self.args), self.kwargs


class HeadOutputSite:
    """Per-head outputs at one layer: a [b, s, H, hd] view of the o_proj input."""

    def __init__(self, plan: Plan, layer: int, step: int, value: torch.Tensor):
        self.plan = plan
        self.layer = layer
        self.step = step
        b, s, _ = value.shape
        self.value = value.view(b, s, plan.adapter.n_heads, plan.adapter.head_dim)
        self.changed = False

    def columns(self, positions: Sequence[int] | None) -> torch.Tensor | None:
        """Padded columns [b, n] for prompt positions at prefill; None = all columns."""
        if positions is None:
            return None
        if self.step > 0:
            return torch.zeros((self.value.shape[0], 1), dtype=torch.long)
        return self.plan.batch.absolute(positions)

    def edit(self) -> torch.Tensor:
        """Switch to a private copy before the first in-place edit."""
        if not self.changed:
            self.value = self.value.clone()
            self.changed = True
        return self.value

    def flat(self) -> torch.Tensor:
        b, s = self.value.shape[:2]
        return self.value.reshape(b, s, -1)


# --------------------------------------------------------------------------------------
# Interventions and captures
# --------------------------------------------------------------------------------------
@dataclass
class Intervention:
    """Something that acts at the attention call and/or the head-output site."""

    steps: Steps = field(default="all", kw_only=True)

    def attention_layers(self) -> set[int]:
        return set()

    def output_layers(self) -> set[int]:
        return set()

    def active(self, step: int) -> bool:
        return self.steps == "all" or (self.steps == "prefill") == (step == 0)

    def at_attention(self, call: AttentionCall, record: dict) -> None:
        pass

    def at_head_output(self, site: HeadOutputSite, record: dict) -> None:
        pass

    def validate(self, handle: ModelHandle, batch: Batch) -> None:
        pass

    #: captures read after every edit at the same site
    reads = False


@dataclass
class UniformAttention(Intervention):
    """Zero the query of chosen heads: equal logits, i.e. uniform attention over the
    positions the mask allows. This is the head masking of the retrieval-head paper."""

    heads: HeadMap

    def attention_layers(self):
        return set(self.heads)

    def validate(self, handle, batch):
        check_heads(handle, self.heads)

    def at_attention(self, call, record):
        heads = self.heads.get(call.layer)
        if heads:
            call.query[:, list(heads)] = 0


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
        rows, heads, sources = (torch.tensor(column) for column in zip(*picks, strict=True))
        value = site.edit()
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
        cols = call.plan.batch.absolute(self.keys) - call.key_offset  # cache indices [b, n]
        mask = torch.zeros(cols.shape[0], call.k_len + 1, dtype=torch.bool)
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
        head_sel = torch.zeros(n_heads, dtype=torch.bool)
        head_sel[list(heads)] = True
        where = where[:, None] & head_sel[None, :, None, None]  # [b, H, q, k]
        if self.mode == "add":
            bias = where.float() * float(self.value)
        else:
            logits = attn_math.attention_logits(
                call.query.detach(), call.key.detach(), call.scaling, softcap=call.softcap
            )
            bias = torch.where(where, self.value * logits.abs(), torch.zeros(()))
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
        return torch.ones(b, q_len, dtype=torch.bool)
    start = query_start_columns(call.plan.batch, query_from)  # [b]
    return torch.arange(q_len)[None, :] >= start[:, None]


@dataclass
class SinkCalibration(Intervention):
    """ACT-style attention-sink calibration in chosen heads.

    In each steered query row, attention on the row's sink keys is scaled by `beta`
    and the removed mass goes to every other key in proportion to its attention, so
    the row still sums to 1. Written as a logit bias computed from the row's
    probabilities (after any bias added before it): with S the row's mass on its
    sinks, sink logits get log(beta * (1 - S) / (1 - beta * S)).

    `sinks` maps layer -> bool [b, H, width] over padded prompt columns (see
    `AttentionReceived` and `core.modulation.find_sinks`); generated tokens are
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
        sinks = torch.zeros(b, len(heads), call.total_len, dtype=torch.bool)
        sinks[..., :width] = self.sinks[call.layer][:, heads].bool()
        sinks = sinks[..., call.key_offset :]  # cache columns [b, h, k]
        mass = (probs * sinks[:, :, None]).sum(-1, keepdim=True)  # [b, h, q, 1]
        eps = 1e-6
        shift = torch.log(
            self.beta * (1 - mass).clamp(min=eps) / (1 - self.beta * mass).clamp(min=eps)
        )
        steered = query_rows_mask(call, self.query_from)[:, None, :, None]  # [b, 1, q, 1]
        bias = torch.zeros(b, call.query.shape[1], call.q_len, call.k_len)
        bias[:, heads] = torch.where(sinks[:, :, None] & steered, shift, 0.0)
        call.add_bias(bias)


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
        later = torch.tril(torch.ones(call.q_len, call.k_len, dtype=torch.bool), diagonal=-1)
        counted = later[None] & batch.valid()[:, :, None]  # [b, query, key]
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


@dataclass
class AttentionPatternScores(AttentionRows):
    """Per-head attention mass on pattern positions, averaged over query rows.

    `patterns` maps a score name to a bool tensor [b, s, s] over padded columns
    (query row, key column); `row_masks` (same names, [b, s]) says which query rows
    count, by default every real token. Records `(name, layer)` -> [b, H]:
    sum over counted rows of the row's attention on pattern keys, divided by the
    number of counted rows. With every row counted this is TransformerLens's
    head-detector "mul" score. Prefill only; rows come from q and k like
    `AttentionRows`, one layer at a time.
    """

    patterns: Mapping[str, torch.Tensor] = field(default_factory=dict)
    row_masks: Mapping[str, torch.Tensor] | None = None
    positions: Sequence[int] | None = None
    steps: Steps = field(default="prefill", kw_only=True)

    def validate(self, handle, batch):
        super().validate(handle, batch)
        for name, pattern in self.patterns.items():
            if tuple(pattern.shape) != (batch.size, batch.width, batch.width):
                raise InvalidParamsError(
                    f"pattern {name!r} has shape {tuple(pattern.shape)}, expected "
                    f"{(batch.size, batch.width, batch.width)}"
                )

    def at_attention(self, call, record):
        batch = call.plan.batch
        probs = call.probabilities()  # [b, H, s, s]
        real = batch.valid()
        for name, pattern in self.patterns.items():
            counted = real if self.row_masks is None else self.row_masks[name] & real
            mass = (probs * pattern[:, None].to(probs.dtype)).sum(-1)  # [b, H, s]
            mass = (mass * counted[:, None].to(probs.dtype)).sum(-1)
            record[(name, call.layer)] = mass / counted.sum(-1, keepdim=True).clamp(min=1)


# --------------------------------------------------------------------------------------
# The plan: one ordered walk over the layers
# --------------------------------------------------------------------------------------
class Plan:
    """Interventions grouped per layer and site, edits before reads.

    `visit(step)` runs inside a trace: it touches each needed site once, in forward
    order (nnsight requires it), and returns what the captures recorded.
    """

    def __init__(self, handle: ModelHandle, batch: Batch, items: Sequence[Intervention]):
        # Only picklable state: the plan travels with the trace to remote servers.
        self.adapter = handle.adapter
        self.batch = batch
        ordered = [i for i in items if not i.reads] + [i for i in items if i.reads]
        for item in ordered:
            item.validate(handle, batch)
        self.at_attention: dict[int, list[Intervention]] = {}
        self.at_output: dict[int, list[Intervention]] = {}
        for item in ordered:
            for layer in item.attention_layers():
                self.at_attention.setdefault(layer, []).append(item)
            for layer in item.output_layers():
                self.at_output.setdefault(layer, []).append(item)
        self.layers = sorted(set(self.at_attention) | set(self.at_output))

    def visit(self, root: Any, step: int) -> dict:
        record: dict = {}
        for layer in self.layers:
            items = [i for i in self.at_attention.get(layer, ()) if i.active(step)]
            if items:
                site = self.adapter.attention_call(root, layer)
                args, kwargs = site.inputs
                call = AttentionCall(self, layer, step, args, kwargs)
                for item in items:
                    item.at_attention(call, record)
                if call.mask_changed:
                    site.inputs = call.commit()
            items = [i for i in self.at_output.get(layer, ()) if i.active(step)]
            if items:
                module = self.adapter.o_proj(root, layer)
                site = HeadOutputSite(self, layer, step, module.input)
                for item in items:
                    item.at_head_output(site, record)
                if site.changed:
                    module.input = site.flat()
        return record


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------
@dataclass
class ForwardResult:
    """Logits at the requested positions and everything the captures recorded."""

    logits: torch.Tensor | None  # [b, n, vocab]
    records: dict

    def get(self, name: str, layer: int) -> torch.Tensor:
        return self.records[(name, layer)]

    def stacked(self, name: str, layers: Sequence[int]) -> torch.Tensor:
        """Records of one capture for several layers, stacked on a new dim 0."""
        return torch.stack([self.records[(name, layer)] for layer in layers])


def _trace_kwargs(handle: ModelHandle) -> dict[str, Any]:
    return {"remote": handle.remote} if handle.remote else {}


def forward(
    handle: ModelHandle,
    batch: Batch,
    items: Sequence[Intervention] = (),
    logits_at: Sequence[int] | None = (-1,),
) -> ForwardResult:
    """One forward pass with interventions and captures; logits at `logits_at`.

    `logits_at=None` skips reading logits (the model still computes the last one).
    """
    plan = Plan(handle, batch, items)
    inputs = batch.model_inputs()
    last_only = logits_at is not None and list(logits_at) == [-1]
    if logits_at is None or last_only:
        inputs["logits_to_keep"] = 1
    cols = batch.absolute(list(logits_at)) if logits_at is not None and not last_only else None
    with handle.lock:
        saved = _trace_forward(
            handle.model, inputs, plan, logits_at is not None, cols, _trace_kwargs(handle)
        )
    records = saved[0]
    return ForwardResult(saved[1] if logits_at is not None else None, records)


def _trace_forward(root, inputs, plan, read_logits, cols, trace_kwargs) -> list:
    # Every local here is serialised with the trace for remote runs: keep them
    # to the model envoy, tensors and the plan.
    nnsight = import_nnsight()
    with root.trace(inputs, **trace_kwargs):
        saved = nnsight.save(list())
        saved.append(plan.visit(root, 0))
        if read_logits:
            logits = plan.adapter.lm_head(root).output
            if cols is None:
                saved.append(logits[:, -1:].detach())
            else:
                picked = [logits[row, cols[row]] for row in range(logits.shape[0])]
                saved.append(torch.stack(picked).detach())
    return saved


@dataclass
class GenerationResult:
    """Greedy continuation per prompt, with what the captures recorded at each step.

    `steps[t]` holds the records of the forward that produced token t (step 0 is the
    prefill). Rows that stopped early have fewer tokens; their later records are
    meaningless and `tokens` is already cut at the stop token (kept).
    """

    tokens: list[list[int]]
    steps: list[dict]
    stopped: list[bool]

    def text(self, handle: ModelHandle, row: int = 0) -> str:
        return handle.decode(self.tokens[row])


def stop_token_ids(handle: ModelHandle, stop_at_newline: bool = False) -> list[int]:
    """End-of-sequence ids, plus every token containing a newline when asked."""
    tokenizer = handle.tokenizer
    ids = set()
    eos = handle.hf_model.generation_config.eos_token_id
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if stop_at_newline:
        ids.update(newline_token_ids(tokenizer))
    return sorted(ids)


_NEWLINE_CACHE: dict[int, list[int]] = {}


def newline_token_ids(tokenizer: Any) -> list[int]:
    """Ids whose decoded text contains a newline, found from the vocabulary."""
    key = id(tokenizer)
    if key not in _NEWLINE_CACHE:
        vocab = tokenizer.get_vocab()
        found = [i for i in vocab.values() if "\n" in tokenizer.decode([i])]
        _NEWLINE_CACHE[key] = sorted(found)
    return _NEWLINE_CACHE[key]


def generate(
    handle: ModelHandle,
    batch: Batch,
    max_new_tokens: int,
    items: Sequence[Intervention] = (),
    stop_ids: Sequence[int] | None = None,
) -> GenerationResult:
    """Greedy decoding with interventions active at the prefill and every step."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise InvalidParamsError("max_new_tokens must be at least 1")
    handle.check_length(batch.width + max_new_tokens, "prompt plus generated tokens")
    plan = Plan(handle, batch, items)
    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(handle)
    pad_id = handle.tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=stops or None,
        pad_token_id=pad_id if pad_id is not None else (stops[0] if stops else 0),
    )
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with handle.lock, warnings.catch_warnings():
        # A bounded step loop ends with a warning when every row stops early.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        saved = _trace_generate(
            handle.model, inputs, config, plan, max_new_tokens, _trace_kwargs(handle)
        )
    return _collect_generation(saved, batch.size, set(stops))


def _trace_generate(root, inputs, config, plan, max_new_tokens, trace_kwargs) -> list:
    nnsight = import_nnsight()
    with root.generate(inputs, generation_config=config, **trace_kwargs) as tracer:
        saved = nnsight.save(list())
        for step in tracer.iter[:max_new_tokens]:
            record = plan.visit(root, step)
            logits = plan.adapter.lm_head(root).output
            saved.append((logits[:, -1].argmax(-1).detach(), record))
    return saved


def _collect_generation(saved: list, rows: int, stops: set[int]) -> GenerationResult:
    tokens: list[list[int]] = [[] for _ in range(rows)]
    stopped = [False] * rows
    steps = []
    for chosen, record in saved:
        steps.append(record)
        for row in range(rows):
            if not stopped[row]:
                token = int(chosen[row])
                tokens[row].append(token)
                stopped[row] = token in stops
    return GenerationResult(tokens, steps, stopped)


def mean_head_outputs(handle: ModelHandle, batch: Batch, layers: Sequence[int]) -> dict:
    """Mean per-head output over every real token of a reference batch: layer -> [H, hd]."""
    capture = HeadOutputs(list(layers), reduce="mean", name="mean")
    result = forward(handle, batch, [capture], logits_at=None)
    weights = torch.tensor(batch.lengths, dtype=torch.float32)[:, None, None]
    means = {}
    for layer in layers:
        per_row = result.get("mean", layer)
        means[layer] = (per_row * weights).sum(0) / weights.sum()
    return means
