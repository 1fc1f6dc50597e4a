"""KV-cache plans: the budget rule, GQA pooling, KV bytes, RazorAttention's rule, the
random control and the JSON and TSV formats, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headscope.core.errors import InvalidParamsError
from headscope.plugins.retrieval_heads.kv_plan import (
    KVPlan,
    full_cache_bytes,
    full_heads_for_budget,
    kv_cache_bytes,
    make_plan,
    plannable_heads,
    pool_kv_scores,
    random_kv_mask,
    razor_scores,
    streaming_tokens,
    top_kv_mask,
)


def _plan(**changes) -> KVPlan:
    mask = torch.tensor([[True, False, False], [False, True, True]])
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.4]])
    fields = {"sink": 4, "window": 16, "compensate": False, "method": "retrieval"}
    fields.update(changes)
    return make_plan("tiny-llama", mask, scores=scores, **fields)


def test_kv_bytes_by_hand():
    plan = _plan()  # 3 full heads, 3 streaming, of 2 layers x 3 KV heads
    # K and V, head_dim 8, float16 (2 bytes): 32 bytes per token per head
    assert kv_cache_bytes(plan, 100, torch.float16, 8) == 32 * (3 * 100 + 3 * 20)
    assert kv_cache_bytes(plan, 100, "float32", 8) == 64 * (3 * 100 + 3 * 20)
    # a context shorter than sink + window: streaming heads keep every token
    assert kv_cache_bytes(plan, 10, torch.float16, 8) == 32 * 6 * 10
    # the compensation token counts once anything is dropped
    compensated = _plan(compensate=True)
    assert kv_cache_bytes(compensated, 100, torch.float16, 8) == 32 * (3 * 100 + 3 * 21)
    assert kv_cache_bytes(compensated, 20, torch.float16, 8) == 32 * 6 * 20
    assert full_cache_bytes(2, 3, 100, torch.bfloat16, 8) == 32 * 6 * 100
    assert streaming_tokens(100, 4, 16, True) == 21


def test_budget_as_heads_or_as_a_fraction_of_the_cache():
    assert full_heads_for_budget(90, budget=27) == 27
    with pytest.raises(InvalidParamsError, match="outside 0..90"):
        full_heads_for_budget(90, budget=91)
    with pytest.raises(InvalidParamsError, match="number of full KV heads or as a fraction"):
        full_heads_for_budget(90, budget=3, budget_fraction=0.3)
    # 10 heads, 1000 tokens, streaming keeps 100 (0.1): k full heads keep
    # (k + (10 - k) * 0.1) / 10 of the cache; at most 0.3 -> k = 2 (0.28), not 3 (0.37)
    kwargs = {"context_length": 1000, "sink": 20, "window": 80}
    assert full_heads_for_budget(10, budget_fraction=0.3, **kwargs) == 2
    assert full_heads_for_budget(10, budget_fraction=0.28, **kwargs) == 2
    assert full_heads_for_budget(10, budget_fraction=1.0, **kwargs) == 10
    assert full_heads_for_budget(10, budget_fraction=0.1, **kwargs) == 0
    with pytest.raises(InvalidParamsError, match="below what streaming heads alone keep"):
        full_heads_for_budget(10, budget_fraction=0.05, **kwargs)
    # the plan the rule picks does fit its budget
    for fraction in (0.15, 0.3, 0.55, 0.99):
        k = full_heads_for_budget(10, budget_fraction=fraction, **kwargs)
        mask = torch.zeros(2, 5, dtype=torch.bool).flatten()
        mask[:k] = True
        plan = make_plan("m", mask.view(2, 5), 20, 80, False, "retrieval")
        kept = kv_cache_bytes(plan, 1000, "float32", 4) / full_cache_bytes(2, 5, 1000, "float32", 4)
        assert kept <= fraction + 1e-9
        over = make_plan("m", torch.ones(2, 5, dtype=torch.bool), 20, 80, False, "x")
        if k < 10:  # one more full head would overrun it
            more = mask.clone()
            more[k] = True
            over = make_plan("m", more.view(2, 5), 20, 80, False, "x")
            ratio = kv_cache_bytes(over, 1000, "float32", 4) / full_cache_bytes(
                2, 5, 1000, "float32", 4
            )
            assert ratio > fraction


def test_pooling_query_heads_into_kv_heads():
    # 4 query heads over 2 KV heads: heads 0,1 -> KV 0; heads 2,3 -> KV 1 (repeat_kv)
    scores = torch.tensor([[0.1, 0.7, 0.0, 0.2], [0.3, 0.3, 0.9, 0.5]], dtype=torch.float64)
    assert pool_kv_scores(scores, 2).tolist() == [[0.7, 0.2], [0.3, 0.9]]
    mean = pool_kv_scores(scores, 2, "mean")
    assert torch.allclose(mean, torch.tensor([[0.4, 0.1], [0.3, 0.7]], dtype=torch.float64))
    with pytest.raises(InvalidParamsError, match="do not split"):
        pool_kv_scores(scores, 3)


def test_top_mask_breaks_ties_by_position():
    scores = torch.tensor([[0.5, 0.9], [0.5, 0.5]])
    assert top_kv_mask(scores, 2).tolist() == [[True, True], [False, False]]
    assert top_kv_mask(scores, 0).sum() == 0


def test_razor_selection_from_given_scores():
    # 20 heads; top 10% induction (2 heads) plus top 5% echo (1 head)
    induction = torch.arange(20, dtype=torch.float64).view(2, 10)  # best: (1, 9), (1, 8)
    echo = torch.zeros(2, 10, dtype=torch.float64)
    echo[0, 3] = 1.0  # best echo head
    score = razor_scores(induction, echo, 0.10, 0.05)
    chosen = {(int(layer), int(head)) for layer, head in torch.nonzero(score > 0.5)}
    assert chosen == {(1, 9), (1, 8), (0, 3)}
    # scaling both fractions: the next heads in the ranking are the next induction heads
    order = torch.argsort(score.flatten(), descending=True)[:5].tolist()
    assert {divmod(i, 10) for i in order[:3]} == chosen
    assert divmod(order[3], 10) == (1, 7)
    with pytest.raises(InvalidParamsError, match="positive"):
        razor_scores(induction, echo, 0, 0)


def test_random_plan_keeps_the_budget_and_is_seeded():
    first = random_kv_mask((30, 3), 27, np.random.default_rng(5))
    again = random_kv_mask((30, 3), 27, np.random.default_rng(5))
    other = random_kv_mask((30, 3), 27, np.random.default_rng(6))
    assert int(first.sum()) == 27
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_json_round_trip():
    plan = _plan(compensate=True)
    assert KVPlan.from_json(plan.to_json()) == plan
    assert plan.streaming_heads() == {0: [1, 2], 1: [0]}
    with pytest.raises(InvalidParamsError, match="not a KV-cache plan"):
        KVPlan.from_json('{"format": "other"}')
    with pytest.raises(InvalidParamsError, match="not JSON"):
        KVPlan.from_json("{")


def test_tsv_is_duoattentions_pattern_file_and_round_trips():
    plan = _plan()
    text = plan.to_tsv()
    # what DuoAttention's load_attn_pattern reads: np.loadtxt(path, delimiter="\t")
    import io

    loaded = np.loadtxt(io.StringIO(text), dtype=float, delimiter="\t")
    assert loaded.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    # and what its save_full_attention_heads writes for the same mask
    written = io.StringIO()
    np.savetxt(written, loaded, delimiter="\t")
    assert written.getvalue() == text
    back = KVPlan.from_tsv(text, "tiny-llama", 4, 16, method="retrieval")
    assert back.full == plan.full and back.sink == 4 and back.window == 16
    # gate values (before binarising) load too: above 0.5 is full
    gates = KVPlan.from_tsv("0.9\t0.2\n0.51\t0.5\n", "m", 4, 16)
    assert gates.full == ((True, False), (True, False))
    with pytest.raises(InvalidParamsError, match="malformed"):
        KVPlan.from_tsv("1\tx\n", "m", 4, 16)
    with pytest.raises(InvalidParamsError, match="same KV heads"):
        KVPlan.from_tsv("1\t0\n1\n", "m", 4, 16)
    with pytest.raises(InvalidParamsError, match="empty"):
        KVPlan.from_tsv("\n", "m", 4, 16)


# -- models whose layers slide (Gemma 2 and 3: local layers with their own window) ----------
WINDOWS = (8, None, 8)  # layer 1 attends to the whole context


def test_sliding_window_layers_stay_as_the_model_has_them():
    plannable = plannable_heads(2, WINDOWS)
    assert plannable.tolist() == [[False, False], [True, True], [False, False]]
    scores = torch.tensor([[0.9, 0.9], [0.1, 0.5], [0.9, 0.9]])
    # the best heads of the sliding layers are not chosen: they are full already
    assert top_kv_mask(scores, 1, plannable).tolist() == [[True, True], [False, True], [True, True]]
    drawn = random_kv_mask((3, 2), 1, np.random.default_rng(0), plannable)
    assert drawn[0].all() and drawn[2].all() and int(drawn[1].sum()) == 1
    with pytest.raises(InvalidParamsError, match="own sliding window"):
        make_plan("m", torch.tensor([[False, True], [True, True], [True, True]]), 2, 4,
                  False, "x", layer_windows=WINDOWS)  # fmt: skip
    plan = make_plan("m", drawn, 2, 4, True, "random", layer_windows=WINDOWS)
    assert KVPlan.from_json(plan.to_json()) == plan
    assert plan.streaming_heads() == {1: [int(drawn[1].logical_not().nonzero())]}


def test_sliding_window_caches_count_at_their_window():
    # head_dim 4, float32: 32 bytes per token per head; 100 tokens, sink 2 + window 4
    plan = make_plan(
        "m", torch.tensor([[True, True], [True, False], [True, True]]), 2, 4, False, "x",
        layer_windows=WINDOWS,
    )  # fmt: skip
    assert kv_cache_bytes(plan, 100, "float32", 4) == 32 * (4 * 8 + 100 + 6)
    assert full_cache_bytes(3, 2, 100, "float32", 4, WINDOWS) == 32 * (4 * 8 + 2 * 100)
    assert full_cache_bytes(3, 2, 6, "float32", 4, WINDOWS) == 32 * 6 * 6  # shorter than 8
    # the budget counts the sliding layers' fixed 4 x 8 tokens: k full heads of 2 keep
    # (32 + 100 k + 6 (2 - k)) / 232 of the cache
    kwargs = {"context_length": 100, "sink": 2, "window": 4, "fixed_tokens": 32}
    assert full_heads_for_budget(2, budget_fraction=44 / 232, **kwargs) == 0
    assert full_heads_for_budget(2, budget_fraction=138 / 232, **kwargs) == 1
    assert full_heads_for_budget(2, budget_fraction=137 / 232, **kwargs) == 0
    assert full_heads_for_budget(2, budget_fraction=1.0, **kwargs) == 2
    with pytest.raises(InvalidParamsError, match="below what streaming heads alone keep"):
        full_heads_for_budget(2, budget_fraction=43 / 232, **kwargs)
