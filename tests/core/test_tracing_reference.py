"""Every tracing primitive against an independent plain PyTorch / transformers computation.

Each comparison covers all layers and heads of a tiny model per family (Llama-style
with GQA, Qwen2 with one KV head, Gemma 3 with sliding windows, GPT-2), batched with
left padding where the primitive allows it. The `*_detects_*` tests show the same
comparisons fail on a wrong head index, an off-by-one position or a GQA grouping error.
"""

from __future__ import annotations

import pytest
import torch

from headscope.core import attention as attn_math
from headscope.core import tracing as T

from helpers.models import tiny_handle
from helpers.reference import (
    BIAS_SPEC,
    FAMILIES,
    RECORDED,
    biased_model,
    capture_o_inputs,
    dims,
    eager_model,
    greedy,
    hooks,
    out_proj,
    q_proj,
    recording_model,
    replace_heads_hook,
    zero_query_hook,
)

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello world, again"]
ATOL = 2e-5


def batch_and_inputs(handle, prompts=PROMPTS):
    batch = T.make_batch(handle, prompts)
    return batch, batch.model_inputs()


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_rows_match_eager_prefill(family):
    handle = tiny_handle(family)
    batch, inputs = batch_and_inputs(handle)
    positions = [0, 3, 7, -2, -1]
    layers = list(range(handle.n_layers))
    result = T.forward(handle, batch, [T.AttentionRows(layers, positions, output="probs")])
    with torch.no_grad():
        ref = eager_model(family)(**inputs, output_attentions=True).attentions
    cols = batch.absolute(positions)
    for layer in layers:
        ours = result.get("rows", layer)
        assert ours.shape == (2, handle.n_heads, len(positions), batch.width)
        for row in range(2):
            expected = ref[layer][row][:, cols[row]]
            torch.testing.assert_close(ours[row], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_argmax_matches_eager(family):
    handle = tiny_handle(family)
    batch, inputs = batch_and_inputs(handle)
    layers = list(range(handle.n_layers))
    positions = [2, 5, -1]
    result = T.forward(handle, batch, [T.AttentionRows(layers, positions, output="argmax")])
    with torch.no_grad():
        ref = eager_model(family)(**inputs, output_attentions=True).attentions
    cols = batch.absolute(positions)
    for layer in layers:
        for row in range(2):
            expected = ref[layer][row][:, cols[row]]
            top2 = expected.topk(2, dim=-1).values
            clear = (top2[..., 0] - top2[..., 1]) > 1e-4  # skip exact near-ties
            ours = result.get("rows", layer)[row]
            assert torch.equal(ours[clear], expected.argmax(-1)[clear])


def test_attention_rows_detect_position_head_and_grouping_errors():
    handle = tiny_handle("llama")  # 4 query heads over 2 KV heads
    batch, inputs = batch_and_inputs(handle, PROMPTS[:1])
    result = T.forward(handle, batch, [T.AttentionRows([1], [6], output="probs")])
    RECORDED.clear()
    with torch.no_grad():
        ref = recording_model("llama")(**inputs, output_attentions=True).attentions[1][0]
    ours = result.get("rows", 1)[0, :, 0]
    torch.testing.assert_close(ours, ref[:, 6], atol=ATOL, rtol=0)
    assert not torch.allclose(ours, ref[:, 5], atol=1e-3)  # off by one position
    assert not torch.allclose(ours, ref[[1, 0, 3, 2], 6], atol=1e-3)  # wrong head index
    # A wrong GQA grouping (query head h reading KV head h % KV instead of h // 2)
    # gives different rows, so the same comparison catches it.
    seen = RECORDED[1]
    rows = torch.tensor([[6]])
    right = attn_math.attention_probabilities(
        seen["query"], seen["key"], None, seen["scaling"], rows
    )
    torch.testing.assert_close(right[0, :, 0], ref[:, 6], atol=ATOL, rtol=0)
    modulo = seen["key"][:, [0, 1, 0, 1]]  # 4 "KV heads" read one-to-one by heads 0..3
    wrong = attn_math.attention_probabilities(seen["query"], modulo, None, seen["scaling"], rows)
    assert not torch.allclose(wrong[0, :, 0], ref[:, 6], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_rebuilds_attention_inputs_from_projections(family):
    """Adapters' rotary/normalisation reproduce the query and key the model attends with."""
    handle = tiny_handle(family)
    batch, inputs = batch_and_inputs(handle)
    model = recording_model(family)
    outputs: dict = {}

    def grab(name):
        def fn(module, args, output):
            outputs[name] = output.detach()

        return fn

    layer = 1
    q_part = handle.adapter.q_proj(model, layer)
    k_part = handle.adapter.k_proj(model, layer)
    pairs = [(q_part.module, grab("q")), (k_part.module, grab("k"))]
    RECORDED.clear()
    with hooks(pairs, pre=False), torch.no_grad():
        model(**inputs)
    query, key = handle.adapter.queries_keys_from_projections(
        model,
        layer,
        outputs["q"][..., q_part.out_slice],
        outputs["k"][..., k_part.out_slice],
        inputs["position_ids"],
    )
    torch.testing.assert_close(query, RECORDED[layer]["query"], atol=1e-5, rtol=0)
    torch.testing.assert_close(key, RECORDED[layer]["key"], atol=1e-5, rtol=0)
    assert handle.adapter.scaling(layer) == pytest.approx(RECORDED[layer]["scaling"])


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_rows_at_every_decode_step_match_eager_generate(family):
    handle = tiny_handle(family)
    batch, inputs = batch_and_inputs(handle, PROMPTS[:1])
    steps = 6
    layers = list(range(handle.n_layers))
    result = T.generate(
        handle, batch, steps, [T.AttentionRows(layers, [-1], output="probs")], stop_ids=[]
    )
    ref = greedy(eager_model(family), inputs["input_ids"], steps, output_attentions=True)
    generated = ref.sequences[0, batch.width :].tolist()
    assert result.tokens[0] == generated
    for step in range(steps):
        for layer in layers:
            expected = ref.attentions[step][layer][0, :, -1]  # [H, k]
            ours = result.steps[step][("rows", layer)][0, :, 0]
            assert ours.shape[-1] == batch.width + step
            # a sliding-window cache holds only recent keys: align on the right
            torch.testing.assert_close(ours[:, -expected.shape[-1] :], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_output_capture_matches_forward_hook(family):
    handle = tiny_handle(family)
    batch, inputs = batch_and_inputs(handle)
    layers = list(range(handle.n_layers))
    positions = [0, 4, -1]
    result = T.forward(
        handle,
        batch,
        [
            T.HeadOutputs(layers),
            T.HeadOutputs(layers, positions, name="some"),
            T.HeadOutputs(layers, reduce="mean", name="mean"),
        ],
    )
    ref = capture_o_inputs(eager_model(family, "sdpa"), family, inputs, layers)
    cols = batch.absolute(positions)
    valid = batch.valid()
    for layer in layers:
        torch.testing.assert_close(result.get("heads", layer), ref[layer], atol=ATOL, rtol=0)
        for row in range(2):
            torch.testing.assert_close(
                result.get("some", layer)[row], ref[layer][row, cols[row]], atol=ATOL, rtol=0
            )
            mean = ref[layer][row][valid[row]].mean(0)
            torch.testing.assert_close(result.get("mean", layer)[row], mean, atol=ATOL, rtol=0)


def _logits_with_hooks(model, inputs, pairs, pre=True):
    with hooks(pairs, pre=pre), torch.no_grad():
        return model(**inputs).logits[:, -1:]


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_ablation_matches_hooked_model(family):
    handle = tiny_handle(family)
    batch, inputs = batch_and_inputs(handle)
    heads = {0: (1,), 2 % handle.n_layers: (0, 3)}
    ours = T.forward(handle, batch, [T.HeadAblation(T.head_map(heads))]).logits
    model = eager_model(family, "sdpa")
    _, head_dim = dims(model)
    zero = lambda x, h: torch.zeros_like(x)  # noqa: E731
    pairs = [
        (out_proj(model, family, layer), replace_heads_hook(list(hs), head_dim, zero))
        for layer, hs in heads.items()
    ]
    expected = _logits_with_hooks(model, inputs, pairs)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    # The comparison is sensitive to the head index: ablating a neighbour differs.
    wrong = [(out_proj(model, family, 0), replace_heads_hook([2], head_dim, zero))]
    assert not torch.allclose(ours, _logits_with_hooks(model, inputs, wrong), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_ablation_matches_hooked_model(family):
    handle = tiny_handle(family)
    reference_batch = T.make_batch(
        handle, ["A reference sentence.", "Another one, longer than that."]
    )
    means = T.mean_head_outputs(handle, reference_batch, [1])
    # means are the token-weighted mean of hooked outputs over real tokens
    model = eager_model(family, "sdpa")
    captured = capture_o_inputs(model, family, reference_batch.model_inputs(), [1])[1]
    expected_mean = captured[reference_batch.valid()].mean(0)
    torch.testing.assert_close(means[1], expected_mean, atol=ATOL, rtol=0)

    batch, inputs = batch_and_inputs(handle)
    ablation = T.HeadAblation(T.head_map({1: [2]}), mode="mean", means=means)
    ours = T.forward(handle, batch, [ablation]).logits
    _, head_dim = dims(model)
    fill = lambda x, h: expected_mean[h].expand_as(x)  # noqa: E731
    pairs = [(out_proj(model, family, 1), replace_heads_hook([2], head_dim, fill))]
    torch.testing.assert_close(ours, _logits_with_hooks(model, inputs, pairs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_attention_matches_zeroed_query(family):
    handle = tiny_handle(family)
    batch, inputs = batch_and_inputs(handle)
    heads = T.head_map({1: [0, 3]})
    rows = T.AttentionRows([1], [3, -1], output="probs")
    result = T.forward(handle, batch, [T.UniformAttention(heads), rows])
    model = eager_model(family)
    _, head_dim = dims(model)
    pairs = [(q_proj(model, family, 1), zero_query_hook([0, 3], head_dim))]
    with hooks(pairs, pre=False), torch.no_grad():
        ref = model(**inputs, output_attentions=True)
    torch.testing.assert_close(result.logits, ref.logits[:, -1:], atol=1e-4, rtol=0)
    cols = batch.absolute([3, -1])
    allowed = batch.valid()
    for row in range(2):
        for i, col in enumerate(cols[row].tolist()):
            probs = result.get("rows", 1)[row, :, i]
            torch.testing.assert_close(probs, ref.attentions[1][row][:, col], atol=ATOL, rtol=0)
            # masked heads attend uniformly to the real tokens up to the query
            window = allowed[row, : col + 1].sum().item()
            sliding = handle.adapter.sliding_window(1)  # full attention but in Mistral
            window = min(window, sliding) if sliding else window
            for head in (0, 3):
                nonzero = probs[head][probs[head] > 0]
                torch.testing.assert_close(nonzero, torch.full_like(nonzero, 1 / window))


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_matches_hooked_model_and_self_patch_is_identity(family):
    handle = tiny_handle(family)
    clean = ["When Mary and John went out", "A quick test of patching."]
    corrupt = ["When Alex and Sam went home", "A slow trial of replacing."]
    clean_batch, clean_inputs = batch_and_inputs(handle, clean)
    corrupt_batch, corrupt_inputs = batch_and_inputs(handle, corrupt)
    assert clean_batch.width == corrupt_batch.width
    layers = list(range(handle.n_layers))
    source = T.forward(handle, corrupt_batch, [T.HeadOutputs(layers)], logits_at=None)
    corrupt_heads = {layer: source.get("heads", layer) for layer in layers}
    heads = T.head_map({1: [1, 2]})
    ours = T.forward(handle, clean_batch, [T.HeadPatch(heads, corrupt_heads)]).logits

    model = eager_model(family, "sdpa")
    _, head_dim = dims(model)
    ref_source = capture_o_inputs(model, family, corrupt_inputs, [1])[1]
    fill = lambda x, h: ref_source[..., h, :]  # noqa: E731
    pairs = [(out_proj(model, family, 1), replace_heads_hook([1, 2], head_dim, fill))]
    torch.testing.assert_close(
        ours, _logits_with_hooks(model, clean_inputs, pairs), atol=1e-4, rtol=0
    )

    own = T.forward(handle, clean_batch, [T.HeadOutputs(layers)], logits_at=None)
    own_heads = {layer: own.get("heads", layer) for layer in layers}
    all_heads = T.head_map({layer: range(handle.n_heads) for layer in layers})
    baseline = T.forward(handle, clean_batch).logits
    self_patched = T.forward(handle, clean_batch, [T.HeadPatch(all_heads, own_heads)]).logits
    assert torch.equal(baseline, self_patched)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode,value", [("add", 2.5), ("scaled", 0.8)])
def test_attention_bias_matches_hand_written_attention(family, mode, value):
    handle = tiny_handle(family)
    batch, inputs = batch_and_inputs(handle, PROMPTS[:1])
    keys, query_from = [1, 2, 3], 6
    bias = T.AttentionBias(T.head_map({1: [0, 2]}), keys, value, mode=mode, query_from=query_from)
    rows = T.AttentionRows([1], [5, 6, -1], output="probs")
    result = T.forward(handle, batch, [bias, rows])
    BIAS_SPEC.clear()
    BIAS_SPEC[1] = {
        "heads": [0, 2],
        "keys": keys,
        "value": value,
        "mode": mode,
        "query_from": query_from,
    }
    try:
        with torch.no_grad():
            ref = biased_model(family)(**inputs, output_attentions=True)
    finally:
        BIAS_SPEC.clear()
    torch.testing.assert_close(result.logits, ref.logits[:, -1:], atol=1e-4, rtol=0)
    cols = batch.absolute([5, 6, -1])[0]
    torch.testing.assert_close(
        result.get("rows", 1)[0], ref.attentions[1][0][:, cols], atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_bias_zero_is_baseline_and_only_selected_heads_and_keys_change(family):
    handle = tiny_handle(family)
    batch, _ = batch_and_inputs(handle)
    layers = list(range(handle.n_layers))
    rows = T.AttentionRows(layers, [-1], output="probs")
    base = T.forward(handle, batch, [rows])
    heads = T.head_map({1: [1]})
    # keys the last row reaches (Mistral's layers slide over 8 tokens)
    keys = [-3, -2] if handle.adapter.sliding_window(1) else [0, 1]
    zero = T.forward(handle, batch, [T.AttentionBias(heads, keys, 0.0, mode="scaled"), rows])
    torch.testing.assert_close(zero.logits, base.logits, atol=0, rtol=0)
    steered = T.forward(handle, batch, [T.AttentionBias(heads, keys, 3.0), rows])
    for layer in layers:
        before, after = base.get("rows", layer), steered.get("rows", layer)
        if layer < 1:  # upstream of the steered layer nothing moves
            torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
        if layer != 1:  # downstream layers see a changed residual stream
            continue
        others = [h for h in range(handle.n_heads) if h != 1]
        torch.testing.assert_close(after[:, others], before[:, others], atol=1e-6, rtol=0)
        cols = batch.absolute(keys)
        for row in range(2):
            boosted = after[row, 1, 0, cols[row]] / before[row, 1, 0, cols[row]]
            assert torch.all(boosted > 1.5)  # selected keys gain
            rest = torch.ones(batch.width, dtype=torch.bool)
            rest[cols[row]] = False
            rest &= before[row, 1, 0] > 0
            assert torch.all(after[row, 1, 0, rest] < before[row, 1, 0, rest])


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_matches_transformers_greedy(family):
    handle = tiny_handle(family)
    batch, inputs = batch_and_inputs(handle)
    ours = T.generate(handle, batch, 5, stop_ids=[])
    ref = greedy(
        eager_model(family, "sdpa"), inputs["input_ids"], 5, attention_mask=inputs["attention_mask"]
    )
    for row in range(2):
        assert ours.tokens[row] == ref.sequences[row, batch.width :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_interventions_stay_active_at_every_decode_step(family):
    handle = tiny_handle(family)
    batch, inputs = batch_and_inputs(handle, PROMPTS[:1])
    model = eager_model(family, "sdpa")
    _, head_dim = dims(model)
    steps = 8
    zero = lambda x, h: torch.zeros_like(x)  # noqa: E731

    ablated = T.generate(
        handle, batch, steps, [T.HeadAblation(T.head_map({0: [0, 1, 2, 3]}))], stop_ids=[]
    )
    with hooks([(out_proj(model, family, 0), replace_heads_hook([0, 1, 2, 3], head_dim, zero))]):
        ref = greedy(model, inputs["input_ids"], steps)
    assert ablated.tokens[0] == ref.sequences[0, batch.width :].tolist()

    uniform = T.generate(
        handle, batch, steps, [T.UniformAttention(T.head_map({0: [0, 1, 2, 3]}))], stop_ids=[]
    )
    with hooks([(q_proj(model, family, 0), zero_query_hook([0, 1, 2, 3], head_dim))], pre=False):
        ref = greedy(model, inputs["input_ids"], steps)
    assert uniform.tokens[0] == ref.sequences[0, batch.width :].tolist()

    if handle.adapter.sliding_window(1):
        return  # the hand-written reference indexes keys by cache column: a sliding cache shifts them
    BIAS_SPEC.clear()
    BIAS_SPEC[1] = {
        "heads": [0, 1, 2, 3],
        "keys": [0, 1],
        "value": 4.0,
        "mode": "add",
        "query_from": None,
    }
    try:
        ref = greedy(biased_model(family), inputs["input_ids"], steps, output_attentions=True)
    finally:
        BIAS_SPEC.clear()
    rows = T.AttentionRows([1], [-1], output="probs")
    steered = T.generate(
        handle,
        batch,
        steps,
        [T.AttentionBias(T.head_map({1: [0, 1, 2, 3]}), [0, 1], 4.0), rows],
        stop_ids=[],
    )
    assert steered.tokens[0] == ref.sequences[0, batch.width :].tolist()
    for step in range(steps):
        torch.testing.assert_close(
            steered.steps[step][("rows", 1)][0, :, 0],
            ref.attentions[step][1][0, :, -1],
            atol=ATOL,
            rtol=0,
        )


def test_generation_stops_at_stop_tokens_and_reports_it():
    handle = tiny_handle("llama")
    batch = T.make_batch(handle, PROMPTS[:1])
    free = T.generate(handle, batch, 6, stop_ids=[])
    stop = free.tokens[0][2]
    cut = T.generate(handle, batch, 6, stop_ids=[stop])
    first = free.tokens[0].index(stop)
    assert cut.tokens[0] == free.tokens[0][: first + 1]
    assert cut.stopped == [True]
    assert len(cut.steps) == first + 1


def test_gemma3_rows_use_absolute_positions_past_the_sliding_window():
    handle = tiny_handle("gemma3")  # layers 0 and 2 slide over 8 tokens
    batch, inputs = batch_and_inputs(handle, PROMPTS[:1])
    steps = 4
    result = T.generate(
        handle, batch, steps, [T.AttentionRows([0, 1, 2], [-1], output="probs")], stop_ids=[]
    )
    ref = greedy(eager_model("gemma3"), inputs["input_ids"], steps, output_attentions=True)
    for step in range(1, steps):
        total = batch.width + step
        for layer in (0, 2):
            ours = result.steps[step][("rows", layer)][0, :, 0]
            assert ours.shape[-1] == total
            expected = ref.attentions[step][layer][0, :, -1]
            # the reference row covers only the cached window: align on the right
            torch.testing.assert_close(ours[:, -expected.shape[-1] :], expected, atol=ATOL, rtol=0)
            assert torch.all(ours[:, : total - 8] == 0)
