"""Tasks: the JSONL format and its errors, pairing and checks, the metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headscope.core import tasks
from headscope.core.budget import MemoryBudget
from headscope.core.errors import InvalidParamsError
from headscope.core.metrics import TokenMetric
from headscope.core.plugins import build_registry
from headscope.core.tasks import JsonlTask, prepare_task, score_task
from headscope.core.tracing import forward, make_batch

from helpers.models import tiny_handle


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"prompt": "abc abc ab", "answer": "c", "distractor": "x", "corrupted": "abd abc ab"}


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"prompt": "p", "answer": "a"}', "line 2: missing distractor"),
        (
            '{"prompt": "p", "answer": "a", "distractor": "b"}',
            "line 2: give either corrupted or label",
        ),
        (
            '{"prompt": "p", "answer": "a", "distractor": "b", "corrupted": "q", "label": "positive"}',
            "line 2: give either corrupted or label",
        ),
        (
            '{"prompt": "p", "answer": "a", "distractor": "b", "label": "maybe"}',
            "line 2: label must",
        ),
        (
            '{"prompt": "p", "answer": "a", "distractor": "b", "corrupt": "q"}',
            "unknown field(s) corrupt",
        ),
        ('{"prompt": "", "answer": "a", "distractor": "b", "corrupted": "q"}', "prompt must be"),
        ('{"prompt": "p", "answer": 3, "distractor": "b", "corrupted": "q"}', "answer must be"),
    ],
)
def test_malformed_lines_are_named(tmp_path, line, message):
    path = write_jsonl(tmp_path / "task.jsonl", [GOOD, line])
    with pytest.raises(InvalidParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        JsonlTask.load(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InvalidParamsError, match="task file not found"):
        JsonlTask.load(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InvalidParamsError, match="has no examples"):
        JsonlTask.load(tmp_path / "empty.jsonl")


def test_answers_must_be_single_tokens_and_lengths_must_match(tmp_path):
    handle = tiny_handle("llama")  # byte tokenizer: one character = one token
    rows = [GOOD, {**GOOD, "corrupted": "abd abc abc"}, {**GOOD, "prompt": "xyz xyz xyz"}]
    task = build_registry().task(f"jsonl:{write_jsonl(tmp_path / 't.jsonl', rows)}")
    data = prepare_task(handle, task, 10, np.random.default_rng(0))
    assert len(data) == 1  # the other two change length
    assert data.dropped == {"corrupted prompt has a different token length": 2}
    assert data.pairs[0].answers == (handle.encode("c", add_special_tokens=False)[0],)
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "answer": "cd"}])
    with pytest.raises(InvalidParamsError, match="line 2: 'cd' is 2 tokens"):
        prepare_task(handle, JsonlTask.load(bad), 10, np.random.default_rng(0))


def test_labelled_examples_pair_positives_with_negatives_of_equal_length(tmp_path):
    handle = tiny_handle("llama")
    rows = [
        {"prompt": "aaaa", "answer": "a", "distractor": "b", "label": "positive"},
        {"prompt": "bbbbbb", "answer": "a", "distractor": "b", "label": "positive"},
        {"prompt": "cccc", "answer": "a", "distractor": "b", "label": "negative"},
        {"prompt": "ddd", "answer": "a", "distractor": "b", "label": "negative"},
    ]
    task = JsonlTask.load(write_jsonl(tmp_path / "l.jsonl", rows))
    data = prepare_task(handle, task, 10, np.random.default_rng(0))
    assert [(p.example.prompt, p.corrupted_text) for p in data.pairs] == [("aaaa", "cccc")]
    assert data.dropped == {
        "positive without a negative of the same token length": 1,
        "negative without a positive of the same token length": 1,
    }


def test_token_metric_and_task_scores_match_plain_logits(tmp_path):
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]])
    diff = TokenMetric.from_tokens([[3], [0, 1]], [[0, 1], [2]], "logit_diff")
    torch.testing.assert_close(diff(logits), torch.tensor([4 - 1.5, 0.25 + 1.0]))
    probs = TokenMetric.from_tokens([[3], [0, 1]], [[0, 1], [2]], "prob_diff")
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(
        probs(logits), torch.stack([p[0, 3] - p[0, 0] - p[0, 1], p[1, 0] + p[1, 1] - p[1, 2]])
    )

    handle = tiny_handle("llama")
    rows = [GOOD, {"prompt": "hello", "answer": "o", "distractor": "l", "corrupted": "help!"}]
    data = prepare_task(
        handle, JsonlTask.load(write_jsonl(tmp_path / "s.jsonl", rows)), 5, np.random.default_rng(0)
    )
    scores = score_task(handle, data)
    for i, pair in enumerate(data.pairs):
        last = forward(handle, make_batch(handle, [pair.clean])).logits[0, -1]
        expected = last[pair.answers[0]] - last[pair.distractors[0]]
        assert float(scores.clean[i]) == pytest.approx(float(expected), abs=1e-4)
        assert bool(scores.top1_correct[i]) == (int(last.argmax()) == pair.answers[0])


def test_task_scores_are_the_same_under_any_memory_budget_and_after_an_out_of_memory(
    tmp_path, monkeypatch
):
    handle = tiny_handle("llama")
    prompts = [  # lengths close enough to share padded batches
        "the cat sat on the mat and the dog sat",
        "the cat sat on a mat and the dog sat",
        "a cat sat on the mat and a dog sat",
        "the cat sat on the mat and the dog ran off",
    ]
    rows = [
        {"prompt": p, "answer": "c", "distractor": "x", "corrupted": p.replace("a", "e")}
        for p in prompts
    ]
    task = JsonlTask.load(write_jsonl(tmp_path / "s.jsonl", rows))
    data = prepare_task(handle, task, 4, np.random.default_rng(0))
    assert len({len(p.clean) for p in data.pairs}) > 1
    sizes = []

    def counted(handle, batch, *args, **kwargs):
        sizes.append(batch.size)
        return forward(handle, batch, *args, **kwargs)

    monkeypatch.setattr(tasks, "forward", counted)
    batched = score_task(handle, data)
    assert max(sizes) > 1  # padded batches
    monkeypatch.undo()
    alone = score_task(handle, data, budget=MemoryBudget(1))  # one pair per pass
    sizes.clear()

    def short_of_memory(handle, batch, *args, **kwargs):
        sizes.append(batch.size)
        if batch.size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return forward(handle, batch, *args, **kwargs)

    monkeypatch.setattr(tasks, "forward", short_of_memory)
    halved = score_task(handle, data, batch_size=4)
    assert max(sizes) > 1
    for other in (alone, halved):
        torch.testing.assert_close(other.clean, batched.clean, atol=1e-5, rtol=0)
        torch.testing.assert_close(other.corrupted, batched.corrupted, atol=1e-5, rtol=0)
        assert torch.equal(other.top1_correct, batched.top1_correct)
