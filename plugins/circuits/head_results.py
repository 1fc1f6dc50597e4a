"""What each head writes to the residual stream, averaged over a prompt's tokens.

Head h's contribution to the residual stream at one position is `z_h @ W_O[h]`
(its slice of the output projection; the projection's bias belongs to no head).
The projection is linear, so the mean over positions of that contribution is the
projection of the mean `z_h`: one capture of mean head outputs per prompt, then
one small matrix product per layer. Gemma's post-attention norm comes after this
sum and is not applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from headscope.core.errors import HeadscopeError
from headscope.core.models import ModelHandle
from headscope.core.tracing import Batch, HeadOutputs, forward


def head_results(
    handle: ModelHandle, batch: Batch, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """[b, layers, H, d_model]: each head's residual-stream write, mean over real tokens."""
    if handle.remote:
        raise HeadscopeError("head results read the output projection's weights: run locally")
    layers = list(range(handle.n_layers)) if layers is None else list(layers)
    capture = HeadOutputs(layers, reduce="mean", name="mean_z")
    result = forward(handle, batch, [capture], logits_at=None)
    out = []
    for layer in layers:
        z = result.get("mean_z", layer)  # [b, H, hd]
        weights = handle.adapter.head_output_weights(handle.hf_model, layer).to(z)
        out.append(torch.einsum("bhk,hkd->bhd", z, weights))
    return torch.stack(out, dim=1)
