"""Prompts as a left-padded batch, and the head and layer selections every
intervention checks against the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import InvalidParamsError
from ..models import ModelHandle

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
        # bookkeeping on the CPU; primitives move it to the device of what they index
        return torch.tensor(out, dtype=torch.long, device="cpu")

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
