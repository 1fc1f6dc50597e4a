"""Attention sinks as ACT finds them (Yu et al. 2024, "Unveiling and Harnessing
Hidden Attention Sinks").

A key is a sink of a head when it receives a disproportionate share of attention:
the mean attention it gets from the query rows after it (`AttentionReceived`)
exceeds `threshold` (ACT's 0.1), wherever it is in the prompt, not only the first
token. ACT keeps each head's first sink (the earliest such key, usually the
first token) and calibrates the others (`SinkCalibration`: scale their attention
by beta, give the mass back to the other keys).

ACT's reference code averages over rows i >= j, the key's own row included; here
only later rows count, so the last prompt token (seen by its own row alone) is
never a sink by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import Batch, make_batch
from .reads import AttentionReceived
from .run import forward


def sink_mask(received: torch.Tensor, threshold: float, keep_first: bool = True) -> torch.Tensor:
    """Sinks from received attention [b, H, width]: bool of the same shape, keys
    above `threshold`, minus each (row, head)'s earliest sink when `keep_first`."""
    sinks = received > threshold
    if keep_first:
        first = sinks.int().argmax(-1, keepdim=True)  # earliest True (0 when none)
        earliest = torch.zeros_like(sinks).scatter_(-1, first, True) & sinks
        sinks = sinks & ~earliest
    return sinks


def find_sinks(
    handle, batch: Batch, layers: Sequence[int], threshold: float, keep_first: bool = True
) -> dict[int, torch.Tensor]:
    """Attention sinks per layer of `batch`'s prompts: layer -> bool [b, H, width]."""
    result = forward(handle, batch, [AttentionReceived(list(layers))], logits_at=None)
    return {
        layer: sink_mask(result.get("received", layer), threshold, keep_first) for layer in layers
    }


def prompt_sinks(
    handle,
    batch: Batch,
    prompts: Sequence[Sequence[int]],
    layers: Sequence[int],
    threshold: float,
    keep_first: bool = True,
) -> dict[int, torch.Tensor]:
    """Sinks found on the `prompts` alone (token ids), laid out over `batch`'s
    columns, whose rows start with those prompts and may continue past them (an
    answer to score), so scoring an answer and generating it see the same sinks."""
    alone = make_batch(handle, [list(p) for p in prompts])
    found = find_sinks(handle, alone, layers, threshold, keep_first)
    sinks = {}
    for layer, mask in found.items():
        out = torch.zeros(batch.size, mask.shape[1], batch.width, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            src, dst = alone.pads[row], batch.pads[row]
            out[row, :, dst : dst + len(prompt)] = mask[row, :, src : src + len(prompt)]
        sinks[layer] = out
    return sinks
