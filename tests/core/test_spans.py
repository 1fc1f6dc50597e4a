"""Context spans -> token positions."""

from __future__ import annotations

import pytest

from headscope.core.spans import (
    CharSpan,
    SpanError,
    TokenSet,
    TokenSpan,
    find_text,
    mark,
    parse_range,
    ragged_to_rows,
)

from helpers.models import tiny_handle

PROMPT = "Context: the code is 4821.\nQuestion: what is the code?"


def test_character_spans_map_to_the_tokens_that_cover_them():
    handle = tiny_handle("llama")  # byte tokenizer: one token per character
    span = find_text(PROMPT, "the code is 4821.")
    marked = mark(handle, PROMPT, [span])
    assert marked.ids == tuple(handle.encode(PROMPT))
    assert marked.positions == tuple(range(span.start, span.end))
    assert marked.end == span.end
    assert set(marked.others()) == set(range(len(PROMPT))) - set(marked.positions)


def test_spans_combine_and_accept_tokens_and_plain_position_sets():
    handle = tiny_handle("llama")
    marked = mark(handle, PROMPT, [TokenSpan(2, 4), TokenSet([10, 3, 30]), CharSpan(0, 1)])
    assert marked.positions == (0, 2, 3, 10, 30)
    ids = handle.encode(PROMPT)
    assert mark(handle, ids, [TokenSet([5, 6])]).positions == (5, 6)


@pytest.mark.parametrize(
    "spans,message",
    [
        ([CharSpan(10, 500)], "outside the prompt"),
        ([CharSpan(5, 5)], "outside the prompt"),
        ([TokenSpan(0, 999)], "outside the prompt"),
        ([TokenSet([3, 999])], "outside the prompt"),
        ([TokenSet([-1])], "outside the prompt"),
        ([TokenSet([])], "empty"),
        ([], "no span"),
    ],
)
def test_spans_outside_the_prompt_are_clear_errors(spans, message):
    handle = tiny_handle("llama")
    with pytest.raises(SpanError, match=message):
        mark(handle, PROMPT, spans)


def test_span_helpers_report_bad_input():
    with pytest.raises(SpanError, match="does not occur"):
        find_text(PROMPT, "not there")
    with pytest.raises(SpanError, match="START:END"):
        parse_range("3-4")
    assert parse_range(" 3:40 ") == (3, 40)
    with pytest.raises(SpanError, match="need the prompt text"):
        mark(tiny_handle("llama"), [1, 2, 3], [CharSpan(0, 1)])
    assert ragged_to_rows([[1, 2, 3], [7]]) == [[1, 2, 3], [7, 7, 7]]


@pytest.mark.real_model
def test_character_spans_on_a_subword_tokenizer(smollm2):
    prompt = "Context: The capital of France is Ottawa. Rain fell.\nQuestion: What is it?"
    span = find_text(prompt, "The capital of France is Ottawa.")
    marked = mark(smollm2, prompt, [span])
    assert list(marked.ids) == smollm2.encode(prompt)
    inside = smollm2.decode([marked.ids[p] for p in marked.positions])
    assert inside.strip() == "The capital of France is Ottawa."
    before = smollm2.decode(marked.ids[: marked.positions[0]])
    after = smollm2.decode(marked.ids[marked.end :])
    assert before.strip() == "Context:" and after.startswith(" Rain")
