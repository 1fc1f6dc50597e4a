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

from headscope.core.models import ModelHandle, import_nnsight
from headscope.core.tracing import Batch, HeadOutputs, forward, on_cpu, trace_kwargs


def head_results(
    handle: ModelHandle, batch: Batch, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """[b, layers, H, d_model]: each head's residual-stream write, mean over real tokens."""
    layers = list(range(handle.n_layers)) if layers is None else list(layers)
    capture = HeadOutputs(layers, reduce="mean", name="mean_z")
    result = forward(handle, batch, [capture], logits_at=None)
    weights = output_weights(handle, batch, layers)
    out = []
    for layer in layers:
        z = result.get("mean_z", layer)  # [b, H, hd]
        out.append(torch.einsum("bhk,hkd->bhd", z, weights[layer].to(z)))
    return torch.stack(out, dim=1)


def output_weights(handle: ModelHandle, batch: Batch, layers: Sequence[int]) -> dict:
    """layer -> the output projection split per head [H, hd, d_model]. A remote
    model's weights live on the server only: they are read there, in one trace."""
    if not handle.remote:
        return {
            layer: handle.adapter.head_output_weights(handle.hf_model, layer) for layer in layers
        }
    inputs = {"input_ids": batch.input_ids[:1, -1:]}  # any input: the weights are the point
    with handle.lock:
        saved = _trace_weights(
            handle.model, inputs, handle.adapter, list(layers), trace_kwargs(handle)
        )
    return dict(zip(layers, on_cpu(list(saved)), strict=True))


def _trace_weights(root, inputs, adapter, layers, trace_kwargs) -> list:
    # Every local here is serialised with the trace for remote runs.
    nnsight = import_nnsight()
    with root.trace(inputs, **trace_kwargs):
        saved = nnsight.save([adapter.head_output_weights(root, layer).clone() for layer in layers])
    return saved
