"""Context spans -> token positions, and the context-faithfulness datasets."""

from __future__ import annotations

import json

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
from headscope.plugins.context.data import (
    ContextExample,
    DatasetError,
    counterfactual_swaps,
    fact_bank,
    key_value_retrieval,
    load_dataset,
    load_jsonl,
    proverb_endings,
    split,
)

from conftest import tiny_handle

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


def test_example_prompt_marks_exactly_the_context():
    example = ContextExample(
        "The sky is green.", "What colour is the sky?", "green", "blue", "It is"
    )
    prompt = example.prompt()
    assert prompt == "Context: The sky is green.\nQuestion: What colour is the sky?\nAnswer: It is"
    span = example.context_span()
    assert prompt[span.start : span.end] == example.context


def test_builtin_sets_are_generated_from_the_seed():
    for build in (counterfactual_swaps, key_value_retrieval, proverb_endings):
        assert build(12, 3) == build(12, 3)
        assert build(12, 3) != build(12, 4)
    for example in counterfactual_swaps(40, 0):
        assert f"{example.answer_prefix} {example.answer}." in example.context
        assert example.answer != example.memory_answer
        assert f"{example.answer_prefix} {example.memory_answer}." not in example.context
    for example in key_value_retrieval(10, 0):
        assert f"door is {example.answer}." in example.context
        assert f"door is {example.memory_answer}." in example.context
    for example in proverb_endings(10, 0):
        assert f'"{example.answer}"' in example.context
    facts = fact_bank()
    assert len({(f["category"], f["subject"]) for f in facts}) == len(facts)


def test_split_keeps_each_fact_on_one_side():
    examples = counterfactual_swaps(150, 1)  # more than the bank: facts repeat
    calibration, held_out = split(examples, 0.5, 7)
    assert len(calibration) + len(held_out) == 150
    assert not {e.group for e in calibration} & {e.group for e in held_out}
    assert split(examples, 0.5, 7) == (calibration, held_out)


def test_jsonl_datasets_and_their_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    rows = [
        {"context": "A is 1.", "question": "A?", "answer": "1", "memory_answer": "2"},
        {"context": "B is 3.", "question": "B?", "answer": "3", "answer_prefix": "B is"},
    ]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = load_jsonl(good)
    assert [e.answer for e in examples] == ["1", "3"]
    assert examples[0].memory_answer == "2" and examples[1].memory_answer is None
    assert load_dataset(str(good), 1, 0) == examples[:1]

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DatasetError, match="no examples"):
        load_jsonl(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"context": "x", "question": "y", "answer": "z"}\n{not json\n')
    with pytest.raises(DatasetError, match="line 2: not valid JSON"):
        load_jsonl(broken)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"context": "x", "question": "y"}\n')
    with pytest.raises(DatasetError, match="line 1 lacks .*answer"):
        load_jsonl(missing)
    with pytest.raises(DatasetError, match="not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("nonsense", 4, 0)
    with pytest.raises(DatasetError, match="cannot be split"):
        split(examples[:1], 0.5, 0)
