"""Every primitive through nnsight's remote="local" path: the traces serialise.

remote="local" serialises the trace exactly as a request to NDIF would, hides
modules that are not installed on the server, deserialises and runs it. Results
must equal the plain local run.
"""

from __future__ import annotations

import pytest
import torch

from headscope.core import tracing as T

from helpers.models import tiny_handle
from helpers.reference import local_and_remote

PROMPTS = ["Remote execution check, one.", "And two"]


def _items(handle, batch):
    layers = list(range(handle.n_layers))
    source = T.forward(handle, batch, [T.HeadOutputs(layers)], logits_at=None)
    means = T.mean_head_outputs(handle, batch, [0])
    return {
        "rows": [T.AttentionRows(layers, [0, -1], output="probs")],
        "argmax": [T.AttentionRows(layers, [-1], output="argmax")],
        "capture": [T.HeadOutputs(layers, [1, -1])],
        "zero": [T.HeadAblation(T.head_map({0: [1]}))],
        "mean": [T.HeadAblation(T.head_map({0: [2]}), mode="mean", means=means)],
        "uniform": [T.UniformAttention(T.head_map({1: [0, 3]}))],
        "patch": [T.HeadPatch(T.head_map({1: [1]}), {1: source.get("heads", 1) * 0.5})],
        "bias": [T.AttentionBias(T.head_map({1: [2]}), [0, 1], 0.7, mode="scaled")],
    }


def _same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    else:
        assert a == b


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_primitives_serialise(family):
    handle = tiny_handle(family)
    batch = T.make_batch(handle, PROMPTS)
    for name, items in _items(handle, batch).items():
        local, remote = local_and_remote(handle, T.forward, batch, items)
        _same(local.logits, remote.logits)
        _same(local.records, remote.records), name


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generation_primitives_serialise(family):
    handle = tiny_handle(family)
    batch = T.make_batch(handle, PROMPTS[:1])
    items = [
        T.UniformAttention(T.head_map({0: [1]})),
        T.AttentionBias(T.head_map({1: [0]}), [0, 2], 1.5),
        T.AttentionRows([1, 2], [-1], output="argmax"),
    ]
    local, remote = local_and_remote(handle, T.generate, batch, 4, items, stop_ids=[])
    assert local.tokens == remote.tokens
    for a, b in zip(local.steps, remote.steps, strict=True):
        _same(a, b)
