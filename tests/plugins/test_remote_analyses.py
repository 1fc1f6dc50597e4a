"""Every built-in analysis end to end through nnsight's remote="local" path.

remote="local" serialises each trace as a request to NDIF would be and runs it
from the deserialised copy, so an analysis that passes here can run on a
`remote:` model. Each runs on a tiny model with small params, once locally and
once through that path, and must store the same findings. Batched prompts go to
the server as one request per batch loop (an nnsight session), so the remote run
sends fewer requests than the local run makes traces.
"""

from __future__ import annotations

import json

import pytest

from headscope.core import jobs
from headscope.core.plugins import build_registry
from headscope.storage.store import Store

from helpers.models import tiny_handle

# Byte-level tiny models: answers are single characters; corruptions keep the length.
ROWS = [
    ("the cat sat on the mat and the cat", " ", "x", "the dog sat on the mat and the dog"),
    ("abc abc abc ab", "c", "d", "abd abe abf ab"),
    ("one two one two one tw", "o", "e", "one tqo ont twe oni tw"),
    ("red blue red blue red blu", "e", "a", "red blue rod blue rud blu"),
]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    lines = [
        json.dumps({"prompt": p, "answer": a, "distractor": d, "corrupted": c})
        for p, a, d, c in ROWS
    ]
    path.write_text("\n".join(lines) + "\n")
    return f"jsonl:{path}"


def small_params(analysis: str, task: str) -> dict:
    return {
        "head-detector": {"n_random": 2, "random_length": 16, "prompts": ["a b a b c a b"]},
        "retrieval-heads": {
            "lengths": [300],
            "depths": [50],
            "mask_top_k": [2],
            "mask_lengths": [300],
            "random_draws": 1,
            "max_new_tokens": 4,
        },
        "kv-cache-plan": {
            "method": "random",
            "budget": 2,
            "eval_lengths": [300],
            "eval_depths": [50],
            "eval_budgets": [0.5],
            "sink": 4,
            "window": 16,
            "max_new_tokens": 2,
            "ppl_tokens": 16,
        },
        "head-patching": {"task": task},
        "sae-circuit": {
            "task": task,
            "steps": 10,
            "seeds": 1,
            "train_prompts": 2,
            "reference_top_k": 3,
        },
        "context-heads": {"n_examples": 6, "batch_size": 6, "max_new_tokens": 2},
        "attention-sinks": {
            "task": task,
            "n_examples": 4,
            "min_layer": 0,
            "random_draws": 1,
            "bootstrap": 100,
            "batch_size": 1,
        },
        "attention-modulation": {
            "n_examples": 6,
            "batch_size": 6,
            "max_new_tokens": 2,
            "random_draws": 1,
            "top_k": 2,
            "min_layer": 1,
        },
    }[analysis]


BUILT_IN = (
    "head-detector",
    "retrieval-heads",
    "kv-cache-plan",
    "head-patching",
    "sae-circuit",
    "context-heads",
    "attention-modulation",
    "attention-sinks",
)


@pytest.fixture
def counted(monkeypatch):
    """Counts of traces run (forward passes and generations) and of remote requests."""
    from nnsight.intervention.backends.local import LocalSimulationBackend
    from nnsight.intervention.tracer import InterleavingTracer

    counts = {"traces": 0, "requests": 0}
    leave = InterleavingTracer.__exit__

    def leaving(self, *args):
        counts["traces"] += 1
        return leave(self, *args)

    monkeypatch.setattr(InterleavingTracer, "__exit__", leaving)
    send = LocalSimulationBackend.__call__

    def sending(self, tracer):
        counts["requests"] += 1
        return send(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", sending)
    return counts


def run_once(store, registry, handle, analysis: str, params: dict) -> dict:
    # a budget of one prompt per pass: many batches, so grouping them shows
    prepared = jobs.prepare(registry, analysis, handle.name, params, seed=3, max_memory=1)
    jobs.check_against_model(prepared, handle, registry)
    run_id = jobs.record(store, prepared)
    summary = jobs.execute(store, registry, run_id, prepared, model_loader=lambda: handle)
    assert summary.status == "succeeded", summary.error
    return {
        (row["layer"], row["head"], row["metric"]): row["value"]
        for row in store.head_scores(run_id)
    }


@pytest.mark.parametrize("analysis", BUILT_IN)
def test_analysis_runs_through_remote_serialisation(analysis, task, tmp_path, counted):
    registry = build_registry()
    assert set(BUILT_IN) <= set(registry.analyses)
    store = Store(str(tmp_path / "remote.db"))
    handle = tiny_handle("llama")
    params = small_params(analysis, task)
    local = run_once(store, registry, handle, analysis, params)
    traces = counted["traces"]
    handle.remote = "local"
    try:
        remote = run_once(store, registry, handle, analysis, params)
    finally:
        handle.remote = False
    assert local and local.keys() == remote.keys()
    for key, value in local.items():
        assert remote[key] == pytest.approx(value, abs=1e-4), key
    assert 1 <= counted["requests"] < traces, counted
