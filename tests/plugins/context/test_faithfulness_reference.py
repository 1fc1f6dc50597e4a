"""Faithfulness metrics and context-sensitivity scores against plain PyTorch.

Answer log-probabilities and perplexity are recomputed from the logits of the
plain transformers model (or the hand-written biased attention of
`reference._biased_eager` when steered); the head scores from eager attention
maps of the full generated sequence.
"""

from __future__ import annotations

import math

import pytest
import torch

from headscope.core import tracing as T
from headscope.core.spans import CharSpan, mark
from headscope.plugins.context.data import NEUTRAL_TEXTS, ContextExample, counterfactual_swaps
from headscope.plugins.context.faithfulness import (
    answer_ids,
    answer_logprobs,
    evaluate,
    matches,
    perplexity,
)
from headscope.plugins.context.modulation import Modulation, generate_marked
from headscope.plugins.context.sensitivity import context_sensitivity

from helpers.models import tiny_handle
from helpers.reference import BIAS_SPEC, biased_model, eager_model

EXAMPLES = [
    ContextExample("The sky is green.", "What colour is the sky?", "green", "blue", "The sky is"),
    ContextExample("Code: 4821. Door: red.", "What is the code?", "4821", "1234"),
    ContextExample("Tom has six cats and no dogs.", "How many cats?", "six cats", "two", "Tom has"),
]


def plain_logprob(model, ids: list[int], answer: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids + answer])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    n = len(ids)
    return sum(float(logp[n - 1 + i, token]) for i, token in enumerate(answer))


def test_answer_logprobs_match_the_plain_model_batched_and_padded():
    handle = tiny_handle("llama")
    ours = answer_logprobs(handle, EXAMPLES, [e.answer for e in EXAMPLES], batch_size=2)
    model = eager_model("llama")
    for example, value in zip(EXAMPLES, ours, strict=True):
        ids = handle.encode(example.prompt())
        expected = plain_logprob(model, ids, answer_ids(handle, example.answer))
        assert value == pytest.approx(expected, abs=1e-4)


def test_steered_answer_logprobs_match_hand_written_attention():
    handle = tiny_handle("llama")
    heads = {1: [0, 3], 2: [2]}
    modulation = Modulation(T.head_map(heads), alpha=0.9)
    ours = answer_logprobs(handle, EXAMPLES, [e.answer for e in EXAMPLES], modulation)
    for example, value in zip(EXAMPLES, ours, strict=True):
        marked = example.marked(handle)
        BIAS_SPEC.clear()
        for layer, hs in heads.items():
            BIAS_SPEC[layer] = {
                "heads": hs,
                "keys": list(marked.positions),
                "value": 0.9,
                "mode": "scaled",
                "query_from": marked.end,
            }
        try:
            expected = plain_logprob(
                biased_model("llama"), list(marked.ids), answer_ids(handle, example.answer)
            )
        finally:
            BIAS_SPEC.clear()
        assert value == pytest.approx(expected, abs=1e-4)
    unsteered = answer_logprobs(handle, EXAMPLES, [e.answer for e in EXAMPLES])
    assert ours != pytest.approx(unsteered, abs=1e-3)


def test_perplexity_matches_the_plain_model():
    handle = tiny_handle("llama")
    texts = NEUTRAL_TEXTS[:3]
    model = eager_model("llama")
    total, count = 0.0, 0
    for first, rest in texts:
        ids = handle.encode(f"Text: {first}")
        tail = handle.encode(" " + rest, add_special_tokens=False)
        total += plain_logprob(model, ids, tail)
        count += len(tail)
    assert perplexity(handle, texts=texts, batch_size=2) == pytest.approx(
        math.exp(-total / count), rel=1e-5
    )


def test_evaluate_counts_wins_and_exact_matches():
    handle = tiny_handle("llama")
    result = evaluate(handle, EXAMPLES, max_new_tokens=3)
    rows = result.rows
    wins = [r["answer_logprob"] > r["memory_logprob"] for r in rows]
    assert result.metrics["faithful_prob"] == pytest.approx(sum(wins) / 3)
    assert result.metrics["margin"] == pytest.approx(
        sum(r["answer_logprob"] - r["memory_logprob"] for r in rows) / 3
    )
    assert result.metrics["faithful_em"] == sum(
        matches(r["generated"], r["answer"]) for r in rows
    ) / len(rows)


def test_answer_matching_is_by_whole_words():
    assert matches(" Ottawa.\nMore text", "Ottawa")
    assert matches('"J.K. Rowling" wrote it', "J.K. Rowling")
    assert not matches(" Oslo", "O")
    assert not matches(" 48210", "4821")
    assert matches(" O, the symbol", "O")


def reference_scores(handle, marked, generated):
    """Context mass, answer-row mass and lookback ratio from eager attention maps."""
    model = eager_model("llama")
    layers, heads = handle.n_layers, handle.n_heads
    totals = {name: torch.zeros(layers, heads) for name in ("cm", "am", "lr")}
    counted = 0
    for m, tokens in zip(marked, generated, strict=True):
        ids = torch.tensor([list(m.ids) + tokens])
        with torch.no_grad():
            maps = model(ids, output_attentions=True).attentions
        n, context = len(m), list(m.positions)
        start = min(m.end, n - 1)
        ratios = torch.zeros(layers, heads)
        steps = 0
        for layer in range(layers):
            a = maps[layer][0]  # [H, s, s]
            totals["cm"][layer] += a[:, start:n][:, :, context].sum(-1).mean(-1)
            totals["am"][layer] += a[:, n - 1, context].sum(-1)
        for t in range(1, len(tokens)):
            row = n + t - 1
            for layer in range(layers):
                a = maps[layer][0][:, row]
                a_ctx = a[:, context].mean(-1)
                a_new = a[:, n : row + 1].mean(-1)
                ratios[layer] += a_ctx / (a_ctx + a_new)
            steps += 1
        if steps:
            totals["lr"] += ratios / steps
            counted += 1
    return (
        totals["cm"] / len(marked),
        totals["am"] / len(marked),
        totals["lr"] / max(counted, 1),
    )


def test_context_sensitivity_matches_eager_attention_maps():
    handle = tiny_handle("llama")
    marked = [e.marked(handle) for e in EXAMPLES]
    ours = context_sensitivity(handle, marked, max_new_tokens=4, batch_size=2)
    generated = generate_marked(handle, marked, None, 4, stop_at_newline=True).tokens
    assert all(len(tokens) > 1 for tokens in generated)  # the lookback ratio is exercised
    context_mass, answer_mass, lookback = reference_scores(handle, marked, generated)
    torch.testing.assert_close(ours["context_mass"], context_mass, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["answer_context_mass"], answer_mass, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["lookback_ratio"], lookback, atol=1e-5, rtol=0)


def test_counterfactual_prompts_fit_tiny_models_and_mark_their_context():
    handle = tiny_handle("gpt2")
    example = counterfactual_swaps(1, 0)[0]
    marked = example.marked(handle)
    text = handle.decode([marked.ids[p] for p in marked.positions])
    assert text == example.context
    span = mark(handle, example.prompt(), [CharSpan(0, 8)])
    assert handle.decode([span.ids[p] for p in span.positions]) == "Context:"


def test_per_token_faithfulness_compares_mean_logprobs_from_the_plain_model():
    """Answers differ in length ("six cats" vs "two"): per token, each answer's summed
    log-probability from the plain model is divided by its own token count."""
    handle = tiny_handle("llama")
    model = eager_model("llama")
    result = evaluate(handle, EXAMPLES, generate=False, batch_size=2)
    wins, margins = [], []
    for example, row in zip(EXAMPLES, result.rows, strict=True):
        ids = handle.encode(example.prompt())
        answer = answer_ids(handle, example.answer)
        memory = answer_ids(handle, example.memory_answer)
        mean_answer = plain_logprob(model, ids, answer) / len(answer)
        mean_memory = plain_logprob(model, ids, memory) / len(memory)
        assert row["answer_logprob_per_token"] == pytest.approx(mean_answer, rel=1e-4)
        assert row["memory_logprob_per_token"] == pytest.approx(mean_memory, rel=1e-4)
        assert row["faithful_per_token"] == (mean_answer > mean_memory)
        wins.append(mean_answer > mean_memory)
        margins.append(mean_answer - mean_memory)
    assert result.metrics["faithful_prob_per_token"] == pytest.approx(sum(wins) / 3)
    assert result.metrics["margin_per_token"] == pytest.approx(sum(margins) / 3, rel=1e-4)
