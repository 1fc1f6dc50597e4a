"""Faithfulness metrics on the memory budget: answer log-probabilities, greedy
answers and perplexity, steered or not, are the same in padded batches, one prompt
per pass and after an injected out-of-memory, and so are the findings of a whole
attention-modulation run (the plain-PyTorch references are in
test_faithfulness_reference)."""

from __future__ import annotations

import pytest

from headscope.core import tracing as T
from headscope.core.budget import MemoryBudget
from headscope.plugins.context.data import ContextExample
from headscope.plugins.context.faithfulness import evaluate, perplexity
from headscope.plugins.context.modulation import Modulation

from helpers.cli import run_cli
from helpers.memory import short_of_memory
from helpers.models import tiny_handle

# marked prompts of 74 to 79 tokens on the byte-level tiny models: one padded batch
EXAMPLES = [
    ContextExample("The sky is green.", "What colour is the sky?", "green", "blue", "The sky is"),
    ContextExample("The sea is pink.", "What colour is the sea?", "pink", "blue", "The sea is"),
    ContextExample("The sun is cold.", "How warm is the sun?", "cold", "hot", "The sun is"),
    ContextExample("Grass is purple.", "What colour is grass?", "purple", "green", "Grass is"),
]


def same_evaluation(ours, theirs):
    assert ours.metrics == pytest.approx(theirs.metrics, abs=1e-5)
    for mine, other in zip(ours.rows, theirs.rows, strict=True):
        assert mine.keys() == other.keys()
        for key, value in other.items():
            if isinstance(value, float):
                assert mine[key] == pytest.approx(value, abs=1e-5), key
            else:
                assert mine[key] == value, key


def test_evaluation_and_perplexity_are_the_same_under_any_budget_and_after_out_of_memory(
    monkeypatch,
):
    handle = tiny_handle("llama")
    # with sink calibration: its sinks are found on each batch's prompts
    steering = Modulation(T.head_map({1: [0, 3], 2: [2]}), alpha=0.9, sink_beta=0.5)

    def measure(**budget):
        found = {}
        for setting in (None, steering):
            found[setting] = evaluate(handle, EXAMPLES, setting, max_new_tokens=3, **budget)
            found[setting].metrics["ppl"] = perplexity(handle, setting, **budget)
        return found

    sizes = short_of_memory(monkeypatch, T, "forward", rows=100)  # only counts
    batched = measure()
    assert sizes[0] == len(EXAMPLES)  # every prompt in one padded batch
    alone = measure(budget=MemoryBudget(1))
    forwards = short_of_memory(monkeypatch, T, "forward", rows=1)
    generations = short_of_memory(monkeypatch, T, "generate", rows=2)
    halved = measure()
    assert max(forwards) > 1 and max(generations) > 2
    for other in (alone, halved):
        for setting, result in batched.items():
            same_evaluation(other[setting], result)


def stored(capsys, db, *extra):
    result = run_cli(
        capsys, "run", "attention-modulation", "-m", "tiny-llama", "-p", "n_examples=8",
        "-p", "top_k=3", "-p", "min_layer=1", "-p", "max_new_tokens=2",
        "-p", "calibration_tokens=3", "-p", "controls=false", "-p", "bootstrap=100",
        "-f", "json", "--db", db, *extra,
    )  # fmt: skip
    assert result.code == 0, result.err
    document = result.json()
    scores = {(r["layer"], r["head"], r["metric"]): r["value"] for r in document["head_scores"]}
    return scores, document["metrics"]


@pytest.mark.slow
def test_a_modulation_run_under_any_budget_or_out_of_memory_stores_the_same_findings(
    capsys, tmp_path, monkeypatch
):
    db = str(tmp_path / "am.db")
    scores, metrics = stored(capsys, db)
    sizes = [short_of_memory(monkeypatch, T, name, rows=10**6) for name in ("forward", "generate")]
    alone = stored(capsys, db, "--max-memory", "1")
    assert {size for seen in sizes for size in seen} == {1}  # the run's budget reached every pass
    monkeypatch.undo()
    sizes = [short_of_memory(monkeypatch, T, name, rows=1) for name in ("forward", "generate")]
    halved = stored(capsys, db)
    assert max(sizes[0]) > 1 and max(sizes[1]) > 1
    for other in (alone, halved):
        assert other[0] == pytest.approx(scores, abs=1e-5)
        assert other[1] == pytest.approx(metrics, rel=1e-5, abs=1e-5)
