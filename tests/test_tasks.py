"""Tasks: the JSONL format and its errors, pairing and checks, built-in tasks, the metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from headscope.core.errors import InvalidParamsError
from headscope.core.metrics import TokenMetric
from headscope.core.plugins import build_registry
from headscope.core.tasks import JsonlTask, prepare_task, score_task
from headscope.core.tracing import forward, make_batch
from headscope.plugins.circuits.tasks import later_and_earlier, year_tokens

from conftest import tiny_handle


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


def test_greater_than_on_a_digit_tokenizer():
    handle = tiny_handle("gpt2")  # byte tokenizer: digits are single tokens
    task = build_registry().task("greater-than")
    data = prepare_task(handle, task, 6, np.random.default_rng(1))
    assert len(data) == 6
    for pair in data.pairs:
        start = pair.example.prompt.split("year ")[1][2:4]
        assert pair.example.corrupted.split("year ")[1][:4].endswith("01")
        later, earlier = (handle.decode(list(ids)) for ids in (pair.answers, pair.distractors))
        tens = int(start[0])
        assert later == "".join(str(d) for d in range(tens + 1, 10))
        assert earlier == "".join(str(d) for d in range(tens))
        assert len(pair.clean) == len(pair.corrupted)


class _Vocabulary:
    """A tokenizer stand-in knowing a fixed set of single tokens."""

    def __init__(self, tokens):
        self.ids = {t: i for i, t in enumerate(tokens)}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.ids[text]] if text in self.ids else [0, 0]}


def test_year_token_modes():
    assert year_tokens(_Vocabulary([f"{y:02d}" for y in range(100)])) == "two-digit"
    assert year_tokens(_Vocabulary([str(d) for d in range(10)])) == "digit"
    with pytest.raises(InvalidParamsError, match="neither"):
        year_tokens(_Vocabulary(["1", "2"]))
    later, earlier = later_and_earlier(32, "two-digit")
    assert (
        later[0] == "33" and later[-1] == "99" and earlier == tuple(f"{y:02d}" for y in range(32))
    )
    assert later_and_earlier(32, "digit") == (tuple("456789"), tuple("012"))


def test_ioi_needs_single_token_names():
    with pytest.raises(InvalidParamsError, match="names that are single tokens"):
        prepare_task(
            tiny_handle("llama"), build_registry().task("ioi"), 4, np.random.default_rng(0)
        )


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


@pytest.mark.real_model
def test_builtin_tasks_on_smollm2(smollm2):
    registry = build_registry()
    ioi = prepare_task(smollm2, registry.task("ioi"), 8, np.random.default_rng(0))
    assert len(ioi) == 8 and not ioi.dropped
    orders = set()
    for pair in ioi.pairs:
        assert len(pair.clean) == len(pair.corrupted)
        io, subject = pair.answers[0], pair.distractors[0]
        assert pair.clean.count(subject) == 2 and pair.clean.count(io) == 1
        assert pair.corrupted.count(subject) == 1 and pair.corrupted.count(io) == 1
        orders.add(pair.clean.index(io) < pair.clean.index(subject))
    assert orders == {True, False}  # ABBA and BABA
    scores = score_task(smollm2, ioi).summary()
    assert scores["accuracy"] >= 0.9
    gt = prepare_task(smollm2, registry.task("greater-than"), 8, np.random.default_rng(0))
    assert score_task(smollm2, gt).summary()["accuracy"] >= 0.9
