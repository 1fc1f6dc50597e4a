"""Attention modulation against hand-written attention on tiny models.

PAINT and PASTA forms go through `Modulation.items` and are compared with the
eager attention of `reference._biased_eager`, whose bias and ACT sink rescaling
are written out by hand (the sink rescaling after the softmax, not as a logit
bias). Also: alpha 0 is exactly the baseline, only the selected heads and the
context keys change, and the steering is active at every decode step.
"""

from __future__ import annotations

import math

import pytest
import torch

from headscope.core import tracing as T
from headscope.core.spans import CharSpan, TokenSet, mark
from headscope.plugins.context.modulation import Modulation, generate_marked

from helpers.models import tiny_handle
from helpers.reference import (
    BIAS_SPEC,
    FAMILIES,
    biased_model,
    eager_model,
    greedy,
    local_and_remote,
)

PROMPT = "Context: the door code is 4821. Question: what is the code? Answer:"
CONTEXT = "the door code is 4821."
ATOL = 2e-5


def marked_prompt(handle, prompt=PROMPT, context=CONTEXT):
    start = prompt.index(context)
    return mark(handle, prompt, [CharSpan(start, start + len(context))])


def reference_run(family, spec_by_layer, input_ids, steps=None):
    """Logits and attentions of the hand-written model, or its greedy decoding."""
    BIAS_SPEC.clear()
    BIAS_SPEC.update(spec_by_layer)
    try:
        model = biased_model(family)
        if steps is None:
            with torch.no_grad():
                return model(input_ids, output_attentions=True)
        return greedy(model, input_ids, steps, output_attentions=True)
    finally:
        BIAS_SPEC.clear()


def paint_spec(heads, keys, alpha, query_from):
    return {
        "heads": heads,
        "keys": keys,
        "value": alpha,
        "mode": "scaled",
        "query_from": query_from,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_paint_matches_hand_written_attention_at_every_decode_step(family):
    handle = tiny_handle(family)
    marked = marked_prompt(handle)
    heads = T.head_map({1: [0, 2]})
    steps = 6
    rows = T.AttentionRows([1], [-1], output="probs")
    ours = generate_marked(handle, [marked], Modulation(heads, alpha=0.8), steps, items=[rows])
    ids = torch.tensor([list(marked.ids)])
    spec = paint_spec([0, 2], list(marked.positions), 0.8, marked.end)
    ref = reference_run(family, {1: spec}, ids, steps)
    assert ours.tokens[0] == ref.sequences[0, ids.shape[1] :].tolist()[: len(ours.tokens[0])]
    for step in range(len(ours.tokens[0])):
        expected = ref.attentions[step][1][0, :, -1]
        got = ours.steps[step][("rows", 1)][0, :, 0]
        torch.testing.assert_close(got[:, -expected.shape[-1] :], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_pasta_matches_hand_written_attention(family):
    handle = tiny_handle(family)
    marked = marked_prompt(handle)
    heads = T.head_map({0: [1], 2: [3]})
    batch = T.make_batch(handle, [list(marked.ids)])
    modulation = Modulation(heads, form="pasta", pasta_coefficient=0.05)
    ours = T.forward(handle, batch, modulation.items(handle, batch, [marked]))
    others = marked.others()
    value = math.log(0.05)
    spec = {
        layer: {
            "heads": list(hs),
            "keys": others,
            "value": value,
            "mode": "add",
            "query_from": marked.end,
        }
        for layer, hs in heads.items()
    }
    ref = reference_run(family, spec, batch.input_ids)
    torch.testing.assert_close(ours.logits, ref.logits[:, -1:], atol=1e-4, rtol=0)


def test_alpha_zero_is_exactly_the_baseline_in_forward_and_generation():
    handle = tiny_handle("llama")
    marked = [marked_prompt(handle), marked_prompt(handle, "Context: x. " + PROMPT)]
    batch = T.make_batch(handle, [list(m.ids) for m in marked])
    heads = T.head_map({layer: range(handle.n_heads) for layer in range(handle.n_layers)})
    zero = Modulation(heads, alpha=0.0)
    base = T.forward(handle, batch, [], logits_at=[-3, -2, -1])
    steered = T.forward(handle, batch, zero.items(handle, batch, marked), logits_at=[-3, -2, -1])
    assert torch.equal(base.logits, steered.logits)
    assert (
        generate_marked(handle, marked, None, 8).tokens
        == generate_marked(handle, marked, zero, 8).tokens
    )


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_only_selected_heads_context_keys_and_rows_after_the_context_change(family):
    handle = tiny_handle(family)
    marked = marked_prompt(handle)
    batch = T.make_batch(handle, [list(marked.ids)])
    n = len(marked)
    layers = list(range(handle.n_layers))
    rows = T.AttentionRows(layers, list(range(n)), output="probs")
    base = T.forward(handle, batch, [rows])
    modulation = Modulation(T.head_map({1: [2]}), alpha=1.0)
    steered = T.forward(handle, batch, [*modulation.items(handle, batch, [marked]), rows])
    context = list(marked.positions)
    for layer in layers:
        before, after = base.get("rows", layer)[0], steered.get("rows", layer)[0]  # [H, n, k]
        if layer < 1:
            torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
        if layer != 1:
            continue
        others = [h for h in range(handle.n_heads) if h != 2]
        torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
        # query rows up to the end of the context are untouched
        torch.testing.assert_close(
            after[2, : marked.end], before[2, : marked.end], atol=1e-6, rtol=0
        )
        for q in range(marked.end, n):
            gained = after[2, q, context].sum() > before[2, q, context].sum()
            assert gained
            rest = [k for k in range(q + 1) if k not in context]
            # every other key keeps its share relative to the others
            ratio = after[2, q, rest] / before[2, q, rest]
            torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), atol=1e-4, rtol=1e-4)


def test_batched_prompts_with_different_contexts_match_each_prompt_alone():
    handle = tiny_handle("llama")
    marked = [
        marked_prompt(handle),
        marked_prompt(
            handle, "Context: a much longer note: the code is 77. Q: code? A:", "the code is 77."
        ),
    ]
    heads = T.head_map({1: [0, 3], 2: [1]})
    for modulation in (Modulation(heads, alpha=0.7), Modulation(heads, form="pasta")):
        batch = T.make_batch(handle, [list(m.ids) for m in marked])
        together = T.forward(handle, batch, modulation.items(handle, batch, marked)).logits
        for row, m in enumerate(marked):
            single = T.make_batch(handle, [list(m.ids)])
            alone = T.forward(handle, single, modulation.items(handle, single, [m])).logits
            torch.testing.assert_close(together[row], alone[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_received_matches_eager_maps(family):
    handle = tiny_handle(family)
    prompts = ["The quick brown fox jumps over the lazy dog.", "Hello world, again"]
    batch = T.make_batch(handle, prompts)
    layers = list(range(handle.n_layers))
    ours = T.forward(handle, batch, [T.AttentionReceived(layers)], logits_at=None)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([handle.encode(prompt)])
        with torch.no_grad():
            maps = eager_model(family)(ids, output_attentions=True).attentions
        n, pad = ids.shape[1], batch.pads[row]
        for layer in layers:
            attention = maps[layer][0]  # [H, n, n]
            expected = torch.zeros(handle.n_heads, n)
            for key in range(n - 1):
                expected[:, key] = attention[:, key + 1 :, key].mean(-1)
            got = ours.get("received", layer)[row, :, pad:]
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sink_calibration_matches_rescaling_after_the_softmax(family):
    handle = tiny_handle(family)
    marked = marked_prompt(handle)
    batch = T.make_batch(handle, [list(marked.ids)])
    sinks = {layer: torch.zeros(1, handle.n_heads, batch.width, dtype=torch.bool) for layer in (1,)}
    sinks[1][0, 0, [3, 7]] = True
    sinks[1][0, 2, [5]] = True
    heads = T.head_map({1: [0, 2]})
    steps = 5
    calibration = T.SinkCalibration(heads, sinks, beta=0.4, query_from=marked.end)
    paint = T.AttentionBias(heads, list(marked.positions), 0.6, "scaled", marked.end)
    rows = T.AttentionRows([1], [-1], output="probs")
    ours = T.generate(handle, batch, steps, [paint, calibration, rows], stop_ids=[])
    spec = paint_spec([0, 2], list(marked.positions), 0.6, marked.end)
    spec.update({"sinks": {0: [3, 7], 2: [5]}, "beta": 0.4})
    ref = reference_run(family, {1: spec}, batch.input_ids, steps)
    assert ours.tokens[0] == ref.sequences[0, batch.width :].tolist()
    for step in range(steps):
        expected = ref.attentions[step][1][0, :, -1]
        got = ours.steps[step][("rows", 1)][0, :, 0]
        torch.testing.assert_close(got[:, -expected.shape[-1] :], expected, atol=ATOL, rtol=0)
        assert torch.allclose(got.sum(-1), torch.ones(handle.n_heads), atol=1e-5)


def test_token_set_spans_steer_like_character_spans():
    handle = tiny_handle("llama")
    by_chars = marked_prompt(handle)
    by_set = mark(handle, PROMPT, [TokenSet(by_chars.positions)])
    assert by_set.positions == by_chars.positions
    batch = T.make_batch(handle, [list(by_chars.ids)])
    modulation = Modulation(T.head_map({1: [1]}), alpha=0.9)
    a = T.forward(handle, batch, modulation.items(handle, batch, [by_chars])).logits
    b = T.forward(handle, batch, modulation.items(handle, batch, [by_set])).logits
    assert torch.equal(a, b)


def test_modulation_items_serialise_for_remote_runs():
    handle = tiny_handle("llama")
    marked = [marked_prompt(handle), marked_prompt(handle, "Context: x. " + PROMPT)]
    batch = T.make_batch(handle, [list(m.ids) for m in marked])
    heads = T.head_map({1: [0, 2], 2: [3]})
    settings = [
        Modulation(heads, alpha=0.6, sink_beta=0.4, sink_threshold=0.05),
        Modulation(heads, form="pasta"),
    ]
    for modulation in settings:
        items = [*modulation.items(handle, batch, marked), T.AttentionReceived([2])]
        local, remote = local_and_remote(handle, T.forward, batch, items)
        torch.testing.assert_close(local.logits, remote.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            local.get("received", 2), remote.get("received", 2), atol=1e-6, rtol=0
        )


def test_sinks_come_from_the_prompt_alone_when_an_answer_follows():
    handle = tiny_handle("llama")
    marked = [marked_prompt(handle), marked_prompt(handle, "Context: x. " + PROMPT)]
    answers = [handle.encode(" 4821", add_special_tokens=False), handle.encode(" 7")]
    prompts = T.make_batch(handle, [list(m.ids) for m in marked])
    scored = T.make_batch(handle, [list(m.ids) + a for m, a in zip(marked, answers, strict=True)])
    on_prompts = T.find_sinks(handle, prompts, [1], 0.05)[1]
    laid_out = T.prompt_sinks(handle, scored, [m.ids for m in marked], [1], 0.05)[1]
    assert on_prompts.any()
    for row, m in enumerate(marked):
        a, b = prompts.pads[row], scored.pads[row]
        assert torch.equal(laid_out[row, :, b : b + len(m)], on_prompts[row, :, a : a + len(m)])
        assert not laid_out[row, :, b + len(m) :].any() and not laid_out[row, :, :b].any()
