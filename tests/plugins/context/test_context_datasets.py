"""The context-faithfulness datasets: built-in sets, splits, JSONL files."""

from __future__ import annotations

import json

import pytest

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


def test_the_counterfactual_set_holds_out_at_least_75_facts():
    from headscope.plugins.context.data import fact_bank, load_dataset, split

    bank = fact_bank()
    assert len(bank) >= 150
    assert len({(f["category"], f["subject"]) for f in bank}) == len(bank)
    assert all(f["choices"] for f in bank)  # every fact has another answer to swap in
    examples = load_dataset("counterfactual", len(bank), seed=0)
    _, held_out = split(examples, 0.5, seed=0)
    assert len(held_out) >= 75
