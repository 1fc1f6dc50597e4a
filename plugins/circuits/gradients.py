"""Gradients of a task metric with respect to every head's output, in one traced pass.

Attribution patching (Nanda 2023; Syed et al. 2023) estimates the effect of patching
head h from a corrupted run into a clean one as

    (a_corrupt[h] - a_clean[h]) . dM/da[h]   (evaluated on the clean run)

summed over positions: one forward with a backward pass on the clean input, one
forward on the corrupted input, instead of one forward per head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from headscope.core.errors import HeadscopeError
from headscope.core.metrics import TokenMetric
from headscope.core.models import ModelHandle, import_nnsight
from headscope.core.tracing import Batch, on_cpu, on_model_device, trace_kwargs


@dataclass
class HeadGradients:
    """The metric per row, and per layer the head outputs and the metric's gradient."""

    metric: torch.Tensor  # [b]
    activations: dict[int, torch.Tensor]  # layer -> [b, s, H, hd]
    gradients: dict[int, torch.Tensor]  # layer -> [b, s, H, hd]


def head_output_gradients(
    handle: ModelHandle,
    batch: Batch,
    metric: TokenMetric,
    layers: Sequence[int] | None = None,
) -> HeadGradients:
    """d(sum of the metric over rows)/d(head outputs): rows do not interact, so row r
    of the gradient is the gradient of row r's metric."""
    if metric.size != batch.size:
        raise HeadscopeError(f"metric has {metric.size} rows, the batch {batch.size}")
    layers = list(range(handle.n_layers)) if layers is None else sorted(set(layers))
    inputs = on_model_device(handle, batch.model_inputs())
    inputs["logits_to_keep"] = 1
    with handle.lock, torch.enable_grad():
        saved = _trace_gradients(
            handle.model, inputs, handle.adapter, layers, metric, trace_kwargs(handle)
        )
    values, acts, grads = on_cpu(list(saved))
    shape = (batch.size, batch.width, handle.n_heads, handle.head_dim)
    return HeadGradients(
        metric=values,
        activations={layer: a.reshape(shape) for layer, a in zip(layers, acts, strict=True)},
        # gradients arrive in reverse forward order
        gradients={layer: g.reshape(shape) for layer, g in zip(layers, grads[::-1], strict=True)},
    )


def _trace_gradients(root, inputs, adapter, layers, metric, trace_kwargs) -> list:
    # Every local here is serialised with the trace for remote runs: keep them
    # to the model envoy, the adapter, the metric, plain values and tensors.
    nnsight = import_nnsight()
    with root.trace(inputs, **trace_kwargs):
        # The weights are frozen: start the graph at the embeddings so every head
        # output downstream has a gradient.
        adapter.embed_tokens(root).output.requires_grad_(True)
        saved = nnsight.save(list())
        acts = []
        for layer in layers:
            act = adapter.o_proj(root, layer).input
            acts.append(act)
            saved.append(act.detach().clone())
        values = metric(adapter.lm_head(root).output)
        grads = nnsight.save(list())
        with values.sum().backward():
            for act in reversed(acts):  # gradients reach the last layer first
                grads.append(act.grad.detach().clone())
        result = nnsight.save([values.detach(), saved, grads])
    return result
