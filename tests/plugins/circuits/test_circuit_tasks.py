"""The circuit family's built-in tasks: greater-than, year tokens, IOI."""

from __future__ import annotations

import numpy as np
import pytest

from headscope.core.errors import InvalidParamsError
from headscope.core.plugins import build_registry
from headscope.core.tasks import prepare_task, score_task
from headscope.plugins.circuits.tasks import later_and_earlier, year_tokens

from helpers.models import tiny_handle


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
