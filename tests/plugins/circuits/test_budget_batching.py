"""Circuit analyses on the memory budget: activation and attribution patching, the
task scores and the SAE's capture give the same numbers in padded batches, one pair
(and one head) per pass, and after an injected out-of-memory (the reference
computations are in test_patching_reference)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from headscope.core import tasks
from headscope.core.budget import MemoryBudget
from headscope.core.tasks import JsonlTask, prepare_task
from headscope.plugins.circuits import head_results, patching
from headscope.plugins.circuits.patching import attribute_every_head, patch_every_head
from headscope.plugins.circuits.sae_circuit import SaeCircuit

from helpers.cli import run_cli
from helpers.memory import short_of_memory
from helpers.models import tiny_handle
from helpers.tasks import write_task_file

# byte-level tiny models: lengths 34, 33, 32 and 31 tokens share one padded batch
ROWS = [
    ("the cat sat on the mat and the cat", " ", "x", "the dog sat on the mat and the dog"),
    ("my cat sat on the big mat, my cat", " ", "x", "my dog sat on the big mat, my dog"),
    ("the cat sat on a mat and the cat", " ", "x", "the dog sat on a mat and the dog"),
    ("one cat sat on the mat, one cat", " ", "x", "one dog sat on the mat, one dog"),
]
ATOL = 1e-5


@pytest.fixture
def task_file(tmp_path):
    return write_task_file(tmp_path / "task.jsonl", ROWS)


def task_data(task_file):
    handle = tiny_handle("llama")
    data = prepare_task(handle, JsonlTask.load(task_file), len(ROWS), np.random.default_rng(0))
    assert len(data) == len(ROWS) and len({len(p.clean) for p in data.pairs}) == len(ROWS)
    return handle, data


def test_patching_every_head_is_the_same_under_any_budget_and_after_out_of_memory(
    task_file, monkeypatch
):
    handle, data = task_data(task_file)
    directions = ["noising", "denoising"]
    batched = patch_every_head(handle, data, directions)
    # clean and corrupted in one padded batch, every head of a direction in one pass
    assert batched.forward_passes == 2 + len(directions)
    alone = patch_every_head(handle, data, directions, budget=MemoryBudget(1))
    heads = handle.n_layers * handle.n_heads
    assert alone.forward_passes == len(ROWS) * (2 + len(directions) * heads)
    sizes = short_of_memory(monkeypatch, patching, "forward", rows=2)
    halved = patch_every_head(handle, data, directions)
    assert max(sizes) > 2 and max(s for s in sizes if s <= 2) == 2
    for other in (alone, halved):
        torch.testing.assert_close(other.clean, batched.clean, atol=ATOL, rtol=0)
        torch.testing.assert_close(other.corrupted, batched.corrupted, atol=ATOL, rtol=0)
        for direction in directions:
            torch.testing.assert_close(
                other.effects[direction], batched.effects[direction], atol=ATOL, rtol=0
            )


def test_attribution_is_the_same_under_any_budget_and_after_out_of_memory(task_file, monkeypatch):
    handle, data = task_data(task_file)
    batched = attribute_every_head(handle, data)
    alone = attribute_every_head(handle, data, budget=MemoryBudget(1))
    sizes = short_of_memory(monkeypatch, patching, "head_output_gradients", rows=3)
    halved = attribute_every_head(handle, data)
    assert sizes[0] == len(ROWS) and 2 in sizes
    for other in (alone, halved):
        torch.testing.assert_close(other, batched, atol=ATOL, rtol=1e-4)


def test_sae_capture_is_the_same_under_any_budget(task_file):
    handle, data = task_data(task_file)

    def capture(budget):
        ctx = SimpleNamespace(model=handle, budget=budget, progress=lambda *args: None)
        return SaeCircuit()._capture(ctx, data, batch_size=32)

    batched, alone = capture(MemoryBudget()), capture(MemoryBudget(1))
    assert batched[0].shape == (len(ROWS), handle.n_layers * handle.n_heads, 64)
    for ours, theirs in zip(alone, batched, strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def stored(capsys, db, *args):
    result = run_cli(capsys, "run", *args, "-m", "tiny-llama", "-f", "json", "--db", db)
    assert result.code == 0, result.err
    document = result.json()
    return {(r["layer"], r["head"], r["metric"]): r["value"] for r in document["head_scores"]}


def assert_same_scores(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-4), key


# small: one short training, the reference computed here by head-patching
SAE_PARAMS = {
    "reference": "auto",
    "reference_top_k": 3,
    "steps": 20,
    "seeds": 1,
    "train_prompts": 4,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "analysis,params",
    [
        ("head-patching", []),
        ("sae-circuit", [f"{name}={value}" for name, value in SAE_PARAMS.items()]),
    ],
)
def test_a_run_under_any_budget_or_out_of_memory_stores_the_same_findings(
    capsys, tmp_path, task_file, monkeypatch, analysis, params
):
    db = str(tmp_path / "c.db")
    args = [analysis, "-p", f"task=jsonl:{task_file}"]
    for param in params:
        args += ["-p", param]
    modules = (tasks, patching, head_results)
    default = stored(capsys, db, *args)
    sizes = [short_of_memory(monkeypatch, module, "forward", rows=10**6) for module in modules]
    assert_same_scores(stored(capsys, db, *args, "--max-memory", "1"), default)
    assert {size for seen in sizes for size in seen} == {1}  # the run's budget reached every pass
    monkeypatch.undo()
    sizes = [short_of_memory(monkeypatch, module, "forward", rows=1) for module in modules]
    assert_same_scores(stored(capsys, db, *args), default)
    assert max(sizes[0]) > 1 and max(sizes[1]) > 1
    assert max(sizes[2], default=0) > 1 or analysis == "head-patching"
