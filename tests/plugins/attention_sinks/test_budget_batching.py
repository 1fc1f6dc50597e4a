"""attention-sinks on the memory budget: sinks, calibrated task metrics and perplexity
are the same in padded batches, one prompt per pass and after an injected
out-of-memory, and so are the findings of a whole run (the plain-PyTorch reference
is in test_calibration_reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headscope.core import tracing as T
from headscope.core.budget import MemoryBudget
from headscope.core.tasks import JsonlTask, prepare_task
from headscope.plugins.attention_sinks.analysis import AttentionSinksParams, Prompts, perplexity

from helpers.cli import run_cli
from helpers.memory import short_of_memory
from helpers.models import tiny_handle
from helpers.tasks import write_task_file

# byte-level tiny models: prompts of 31 to 35 tokens share padded batches
ROWS = [
    ("the cat sat on the mat and the cat", " ", "x", "the dog sat on the mat and the dog"),
    ("my cat sat on the big mat, my cat", " ", "x", "my dog sat on the big mat, my dog"),
    ("the cat sat on a mat and the cat", " ", "x", "the dog sat on a mat and the dog"),
    ("one cat sat on the mat, one cat", " ", "x", "one dog sat on the mat, one dog"),
    ("a red cat sat on the mat, a red cat", " ", "x", "a red dog sat on the mat, a red dog"),
    ("his cat sat on the mat and his cat", " ", "x", "his dog sat on the mat and his dog"),
    ("our cat sat on a mat and our cat", " ", "x", "our dog sat on a mat and our dog"),
    ("the cat ran on the mat and the cat", " ", "x", "the dog ran on the mat and the dog"),
]
THRESHOLD, BETA = 0.05, 0.4


@pytest.fixture
def task_file(tmp_path):
    return write_task_file(tmp_path / "task.jsonl", ROWS)


def test_sinks_metrics_and_perplexity_are_the_same_under_any_budget_and_after_out_of_memory(
    task_file, monkeypatch
):
    handle = tiny_handle("llama")
    data = prepare_task(handle, JsonlTask.load(task_file), len(ROWS), np.random.default_rng(0))
    layers = list(range(handle.n_layers))
    params = AttentionSinksParams(threshold=THRESHOLD, beta=BETA)
    heads = T.head_map({layer: range(handle.n_heads) for layer in layers})

    def measure(budget=None):
        prompts = Prompts(handle, data, layers, params, budget)
        return {
            "sinks": prompts.sink_counts(handle.n_layers, handle.n_heads),
            "plain": prompts.outcomes(handle, None, BETA)["metric"],
            "calibrated": prompts.outcomes(handle, heads, BETA)["metric"],
            "ppl": perplexity(handle, heads, BETA, THRESHOLD, layers, budget=budget),
        }

    sizes = short_of_memory(monkeypatch, T, "forward", rows=100)  # only counts
    batched = measure()
    assert max(sizes) > 1  # padded batches
    assert batched["sinks"].sum() > 0  # something to calibrate
    alone = measure(MemoryBudget(1))
    sizes = short_of_memory(monkeypatch, T, "forward", rows=1)
    halved = measure()
    assert max(sizes) > 1
    for other in (alone, halved):
        assert torch.equal(other["sinks"], batched["sinks"])
        for key in ("plain", "calibrated"):
            assert other[key] == pytest.approx(batched[key], abs=1e-5)
        assert other["ppl"] == pytest.approx(batched["ppl"], rel=1e-5)


def stored(capsys, db, task_file, *extra):
    result = run_cli(
        capsys, "run", "attention-sinks", "-m", "tiny-llama", "-p", f"task=jsonl:{task_file}",
        "-p", "min_layer=1", "-p", f"threshold={THRESHOLD}", "-p", "random_draws=1",
        "-p", "bootstrap=100", "-f", "json", "--db", db, *extra,
    )  # fmt: skip
    assert result.code == 0, result.err
    document = result.json()
    scores = {(r["layer"], r["head"], r["metric"]): r["value"] for r in document["head_scores"]}
    return scores, document["metrics"]


@pytest.mark.slow
def test_a_run_under_any_budget_or_out_of_memory_stores_the_same_findings(
    capsys, tmp_path, task_file, monkeypatch
):
    db = str(tmp_path / "s.db")
    scores, metrics = stored(capsys, db, task_file)
    sizes = short_of_memory(monkeypatch, T, "forward", rows=10**6)
    alone = stored(capsys, db, task_file, "--max-memory", "1")
    assert set(sizes) == {1}  # the run's budget reached every pass
    monkeypatch.undo()
    sizes = short_of_memory(monkeypatch, T, "forward", rows=1)
    halved = stored(capsys, db, task_file)
    assert max(sizes) > 1
    for other in (alone, halved):
        assert other[0] == pytest.approx(scores, abs=1e-5)
        assert other[1] == pytest.approx(metrics, rel=1e-5, abs=1e-5)
