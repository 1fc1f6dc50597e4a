"""Streaming heads (KV-cache plans) against attention with the kept keys written out
by hand, at the prefill and at every decode step, on a tiny model of each family."""

from __future__ import annotations

import pytest
import torch

from headscope.core import tracing as T
from headscope.core.errors import InvalidParamsError
from headscope.core.tracing import streaming

from helpers.models import tiny_handle
from helpers.reference import (
    FAMILIES,
    STREAM_SPEC,
    greedy_without_cache,
    local_and_remote,
    streaming_model,
)

PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Hello world, again and again",
]
ATOL = 1e-4


def plan_for(handle) -> dict[int, list[int]]:
    """Layer 0 streams its first KV head, the last layer every KV head."""
    return {0: [0], handle.n_layers - 1: list(range(handle.n_kv_heads))}


def reference(handle, family, batch, plan, sink, window, compensate, steps):
    group = handle.n_heads // handle.n_kv_heads
    STREAM_SPEC.clear()
    for layer, kv_heads in plan.items():
        STREAM_SPEC[layer] = {
            "heads": [h for kv in kv_heads for h in range(kv * group, (kv + 1) * group)],
            "sink": sink,
            "window": window,
            "pads": batch.pads,
            "compensate": compensate,
        }
    try:
        return greedy_without_cache(
            streaming_model(family), batch.input_ids, batch.attention_mask, steps
        )
    finally:
        STREAM_SPEC.clear()


@pytest.fixture(params=[False, True], ids=["plain", "compensated"])
def compensate(request):
    return request.param


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_heads_match_hand_written_attention_at_prefill_and_decode(
    family, compensate, monkeypatch
):
    monkeypatch.setattr(streaming, "CHUNK_ROWS", 4)  # several bands per prefill
    handle = tiny_handle(family)
    batch = T.make_batch(handle, PROMPTS)
    plan, sink, window, steps = plan_for(handle), 2, 3, 6
    heads = T.StreamingHeads(plan, sink=sink, window=window, compensate=compensate)
    ours = T.generate(handle, batch, steps, [heads], stop_ids=[])
    ref_tokens, ref_logits = reference(handle, family, batch, plan, sink, window, compensate, steps)
    for row in range(batch.size):
        assert ours.tokens[row] == ref_tokens[row].tolist()
    # the prefill's last logits, and the plan really changes them
    prefill = T.forward(handle, batch, [heads])
    torch.testing.assert_close(prefill.logits[:, 0], ref_logits[:, 0], atol=ATOL, rtol=0)
    full = T.forward(handle, batch)
    assert (full.logits - prefill.logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_every_head_full_is_exactly_the_baseline(family):
    handle = tiny_handle(family)
    batch = T.make_batch(handle, PROMPTS)
    base = T.generate(handle, batch, 4, stop_ids=[])
    full = T.generate(handle, batch, 4, [T.StreamingHeads({})], stop_ids=[])
    assert full.tokens == base.tokens
    logits = T.forward(handle, batch, [T.StreamingHeads({0: []})]).logits
    assert torch.equal(logits, T.forward(handle, batch).logits)


def test_a_window_covering_the_context_changes_nothing():
    handle = tiny_handle("llama")
    batch = T.make_batch(handle, PROMPTS)
    wide = T.StreamingHeads(plan_for(handle), sink=0, window=batch.width + 8)
    torch.testing.assert_close(
        T.forward(handle, batch, [wide]).logits, T.forward(handle, batch).logits, atol=ATOL, rtol=0
    )


def test_streaming_heads_reject_bad_heads_and_sizes():
    handle = tiny_handle("llama")
    batch = T.make_batch(handle, PROMPTS)
    for bad, message in [
        (T.StreamingHeads({0: [handle.n_kv_heads]}), "KV head"),
        (T.StreamingHeads({handle.n_layers: [0]}), "layer"),
        (T.StreamingHeads({0: [0]}, window=0), "window"),
        (T.StreamingHeads({0: [0]}, sink=-1), "sink"),
    ]:
        with pytest.raises(InvalidParamsError, match=message):
            T.forward(handle, batch, [bad])


def test_streaming_heads_through_the_remote_serialisation_path():
    handle = tiny_handle("llama")
    batch = T.make_batch(handle, PROMPTS)
    heads = T.StreamingHeads(plan_for(handle), sink=2, window=3, compensate=True)
    local, remote = local_and_remote(handle, T.generate, batch, 4, [heads], stop_ids=[])
    assert remote.tokens == local.tokens
