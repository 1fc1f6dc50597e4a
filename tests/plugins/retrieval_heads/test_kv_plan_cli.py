"""kv-cache-plan end to end through the CLI on tiny models: the plan from stored or
fresh scores, the evaluation, export, bad params (nothing stored), and a plan with
every head full being exactly the model without a plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from headscope.core.tracing import forward, generate, make_batch
from headscope.plugins.retrieval_heads.kv_plan import KVPlan, make_plan
from headscope.storage.store import Store

from helpers.cli import run_cli
from helpers.models import tiny_handle
from helpers.store import finished_run, grid

#: small evaluation settings for the tiny models (512 positions, 3 layers x 2 KV heads)
SMALL = {
    "eval_lengths": [300],
    "eval_depths": [50],
    "eval_budgets": [0.5],
    "sink": 4,
    "window": 16,
    "max_new_tokens": 2,
    "ppl_tokens": 16,
}


def _params(**values) -> list[str]:
    args = []
    for name, value in {**SMALL, **values}.items():
        args += ["-p", f"{name}={json.dumps(value)}"]
    return args


def _retrieval_run(db: str, model: str = "tiny-llama") -> int:
    """A stored retrieval-heads run: query heads 2 and 3 of layer 1 (KV head 1) retrieve."""
    hot = {(1, 2): 0.6, (1, 3): 0.2, (2, 0): 0.15}
    scores = grid("retrieval_score", 3, 4, lambda layer, head: hot.get((layer, head), 0.0))
    return finished_run(Store(db), model, scores, analysis="retrieval-heads")


def _stored_runs(capsys, db: str) -> int:
    listed = run_cli(capsys, "runs", "list", "-f", "json", "--db", db)
    return listed.json()["total"] if listed.code == 0 else 0


def _one_line_error(result, expected: str) -> None:
    assert result.code == 1, (result.code, result.err)
    assert "Traceback" not in result.err + result.out
    assert expected in result.err, result.err


def test_plan_from_a_stored_run_evaluated_and_exported(capsys, tmp_path):
    db = str(tmp_path / "k.db")
    source = _retrieval_run(db)
    result = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-llama", *_params(from_run=source),
        "-f", "json", "--db", db,
    )  # fmt: skip
    assert result.code == 0, result.err
    document = result.json()
    run_id = document["run"]["id"]
    metrics = document["metrics"]
    # the method's own rule: KV heads whose best query head scores above 0.1
    assert metrics["plan_full_heads"] == 2
    full = {
        (r["layer"], r["head"])
        for r in document["head_scores"]
        if r["metric"] == "kv_full" and r["value"] == 1
    }
    assert full == {(1, 1), (2, 0)}  # fmt: skip
    # every setting of the evaluation, with its accuracy, perplexity and KV bytes
    for setting in ("full_300", "streaming_300", "plan_300", "retrieval_b50_300", "random_b50_300"):
        for name in ("needle_accuracy", "perplexity", "kv_bytes", "kv_fraction", "full_heads"):
            assert f"{setting}.{name}" in metrics
    assert metrics["full_300.kv_fraction"] == 1.0
    assert metrics["streaming_300.full_heads"] == 0
    # 50% of the cache at 300 tokens with 20-token streaming heads: 2 of 6 heads full
    assert metrics["retrieval_b50_300.full_heads"] == metrics["random_b50_300.full_heads"] == 2
    assert metrics["retrieval_b50_300.kv_fraction"] <= 0.5
    names = {a["name"] for a in document["artifacts"]}
    assert {"kv_plan.json", "kv_plan.tsv", "kv_plan_accuracy.png", "tests.json"} <= names
    tests = json.loads(
        Path(
            next(a["path"] for a in document["artifacts"] if a["name"] == "tests.json")
        ).read_text()
    )
    assert {row["setting"] for row in tests} >= {"full_300", "streaming_300", "random_b50_300"}
    assert all(len(row["tests"]) == 4 and "response" in row["tests"][0] for row in tests)

    shown = run_cli(capsys, "runs", "show", str(run_id), "--db", db)
    assert shown.code == 0 and "evaluation (held-out needles)" in shown.out
    assert "smallest budget keeping 90%" in shown.out

    exported = run_cli(capsys, "runs", "export", str(run_id), "--format", "kv-plan", "--db", db)
    assert exported.code == 0, exported.err
    assert exported.out.splitlines()[1].split("\t")[1] == "1.000000000000000000e+00"
    as_json = run_cli(capsys, "runs", "export", str(run_id), "--format", "kv-plan-json", "--db", db)
    plan = KVPlan.from_json(as_json.out)
    assert plan.model == "tiny-llama" and plan.method == "retrieval"
    # the exported TSV loads back into the same plan
    back = KVPlan.from_tsv(exported.out, plan.model, plan.sink, plan.window, plan.compensate)
    assert back.full == plan.full == ((False, False), (False, True), (True, False))
    out = tmp_path / "full_attention_heads.tsv"
    written = run_cli(
        capsys, "runs", "export", str(run_id), "--format", "kv-plan", "-o", str(out), "--db", db
    )
    assert written.code == 0 and out.read_text() == exported.out

    # a run of another analysis has no plan to export
    other = run_cli(capsys, "runs", "export", str(source), "--format", "kv-plan", "--db", db)
    _one_line_error(other, f"run {source} is a retrieval-heads run")


def test_budget_in_heads_and_razor_scored_fresh(capsys, tmp_path):
    db = str(tmp_path / "k.db")
    detector = {"n_random": 1, "random_length": 8, "repeats": 2}
    result = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-llama", "-f", "json", "--db", db,
        *_params(method="razor", budget=3, score_params=detector, eval_budgets=[], compensate=True),
    )  # fmt: skip
    assert result.code == 0, result.err
    metrics = result.json()["metrics"]
    assert metrics["plan_full_heads"] == metrics["plan_300.full_heads"] == 3
    assert metrics["plan_random_300.full_heads"] == 3
    assert "max_induction" in metrics and "max_duplicate_token" in metrics
    assert _stored_runs(capsys, db) == 1  # the scoring inside is part of this run


def test_random_plans_are_seeded(capsys, tmp_path):
    db = str(tmp_path / "k.db")
    args = ["run", "kv-cache-plan", "-m", "tiny-llama", "-f", "json", "--db", db]
    args += _params(method="random", budget=2, eval_budgets=[], ppl_tokens=0)
    first, again = (run_cli(capsys, *args, "--seed", "3") for _ in range(2))
    assert first.code == 0, first.err

    def full(result):
        rows = result.json()["head_scores"]
        return {(r["layer"], r["head"]) for r in rows if r["metric"] == "kv_full" and r["value"]}

    assert full(first) == full(again) and len(full(first)) == 2


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"window": 300}, "is not smaller than the context"),
        ({"sink": 200, "window": 100}, "is not smaller than the context"),
        ({"budget": 7}, "more than tiny-llama's 6 KV heads"),
        ({"budget_fraction": 0.01}, "below what streaming heads alone keep"),
        ({"method": "random"}, "method random needs budget"),
        ({"budget": 2, "budget_fraction": 0.3}, "not both"),
        ({"eval_lengths": [600]}, "exceeds tiny-llama's 512 positions"),
        ({"score_params": {"lengths": [2000]}}, "exceed tiny-llama's 512 positions"),
        ({"score_params": {"nonsense": 1}}, "nonsense"),
        ({"from_run": 99}, "no run with id 99"),
        ({"method": "random", "budget": 2, "from_run": 1}, "from_run does not apply"),
    ],
)
def test_bad_params_are_clear_errors_and_store_nothing(capsys, tmp_path, values, expected):
    db = str(tmp_path / "k.db")
    _retrieval_run(db)
    before = _stored_runs(capsys, db)
    result = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-llama", *_params(**values), "--db", db
    )
    _one_line_error(result, expected)
    assert _stored_runs(capsys, db) == before


def test_a_score_run_of_another_model_is_refused_and_nothing_stored(capsys, tmp_path):
    db = str(tmp_path / "k.db")
    other = _retrieval_run(db, model="tiny-qwen2")
    result = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-llama", *_params(from_run=other), "--db", db
    )
    _one_line_error(result, f"run {other} is on tiny-qwen2, not tiny-llama")
    assert _stored_runs(capsys, db) == 1


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_a_plan_with_every_head_full_is_exactly_the_baseline(family):
    handle = tiny_handle(family)
    shape = (handle.n_layers, handle.n_kv_heads)
    plan = make_plan(handle.name, torch.ones(shape, dtype=torch.bool), 4, 8, True, "full")
    batch = make_batch(handle, [list(range(5, 60)), list(range(20, 50))])
    items = [plan.intervention()]
    positions = list(range(20))
    plain = forward(handle, batch, [], logits_at=positions).logits
    planned = forward(handle, batch, items, logits_at=positions).logits
    assert torch.equal(plain, planned)
    assert generate(handle, batch, 6, items).tokens == generate(handle, batch, 6).tokens
    # and a plan that streams one head does change the model
    some = torch.ones(shape, dtype=torch.bool)
    some[0, 0] = False
    streaming = make_plan(handle.name, some, 4, 8, False, "x").intervention()
    changed = forward(handle, batch, [streaming], logits_at=positions).logits
    assert not torch.allclose(plain, changed)


def test_exported_artifacts_are_the_plan_files(tmp_path):
    from headscope.plugins.retrieval_heads.kv_plan_analysis import plan_artifacts

    plan = make_plan("m", torch.tensor([[True, False]]), 4, 16, False, "razor")
    json_file, tsv_file = plan_artifacts(plan)
    assert KVPlan.from_json(json_file.data.decode()) == plan
    assert KVPlan.from_tsv(tsv_file.data.decode(), "m", 4, 16, method="razor") == plan
    assert Path(tsv_file.name).suffix == ".tsv"


def test_retrieval_scored_fresh_in_the_same_run(capsys, tmp_path):
    db = str(tmp_path / "k.db")
    scoring = {"lengths": [300], "depths": [50], "max_new_tokens": 2}
    result = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-llama", "-f", "json", "--db", db,
        *_params(score_params=scoring, budget=1, eval_budgets=[], ppl_tokens=0),
    )  # fmt: skip
    assert result.code == 0, result.err
    metrics = result.json()["metrics"]
    assert "max_retrieval_score" in metrics and metrics["plan_full_heads"] == 1


def test_duo_gates_trained_in_the_run_choose_the_plan(capsys, tmp_path):
    db = str(tmp_path / "k.db")
    duo = {"steps": 2, "length": 320, "sink": 2, "window": 8, "passkeys": 1, "passkey_words": 3}
    result = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-llama", "-f", "json", "--db", db,
        *_params(method="duo", budget=2, duo=duo, eval_budgets=[]),
    )  # fmt: skip
    assert result.code == 0, result.err
    metrics = result.json()["metrics"]
    assert metrics["plan_full_heads"] == metrics["plan_300.full_heads"] == 2
    plan = KVPlan.from_json(
        run_cli(capsys, "runs", "export", "1", "--format", "kv-plan-json", "--db", db).out
    )
    assert plan.method == "duo" and sum(map(sum, plan.full)) == 2
    bad = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-llama", "--db", db,
        *_params(method="duo", duo={"window": 0}),
    )  # fmt: skip
    _one_line_error(bad, "window")
    assert _stored_runs(capsys, db) == 1
    # the gates of run 1 choose a plan at another budget without training again
    again = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-llama", "-f", "json", "--db", db,
        *_params(method="duo", from_run=1, budget=4, eval_budgets=[]),
    )  # fmt: skip
    assert again.code == 0, again.err

    def gates(document):
        return {
            (r["layer"], r["head"]): r["value"]
            for r in document["head_scores"]
            if r["metric"] == "kv_score"
        }

    assert gates(again.json()) == gates(result.json())
    assert again.json()["metrics"]["plan_full_heads"] == 4
    source = _retrieval_run(db)
    refused = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-llama", "--db", db,
        *_params(method="duo", from_run=source),
    )  # fmt: skip
    _one_line_error(refused, "not a kv-cache-plan duo run")


def test_sliding_window_layers_are_left_to_the_model(capsys, tmp_path):
    # tiny Gemma 3: layers 0 and 2 attend through their own 8-token window, layer 1 to
    # everything; only layer 1's KV heads are planned, and its cache is most of the bytes
    db = str(tmp_path / "k.db")
    result = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-gemma3", "-f", "json", "--db", db,
        *_params(method="random", budget=1, eval_budgets=[0.5], eval_plan=True),
    )  # fmt: skip
    assert result.code == 0, result.err
    document = result.json()
    full = {
        (r["layer"], r["head"]): r["value"]
        for r in document["head_scores"]
        if r["metric"] == "kv_full"
    }
    heads = len(full) // 3
    assert all(full[(layer, head)] == 1 for layer in (0, 2) for head in range(heads))
    assert sum(full[(1, head)] for head in range(heads)) == 1
    metrics = document["metrics"]
    assert metrics["streaming_300.full_heads"] == 2 * heads  # the sliding layers'
    # full cache: 2 sliding layers x 8 tokens + 300 tokens, per KV head
    fraction = metrics["streaming_300.kv_fraction"]
    assert fraction == pytest.approx((2 * 8 + 20) / (2 * 8 + 300))
    run_id = document["run"]["id"]
    exported = run_cli(
        capsys, "runs", "export", str(run_id), "--format", "kv-plan-json", "--db", db
    )
    plan = KVPlan.from_json(exported.out)
    assert plan.layer_windows == (8, None, 8)


def test_a_model_whose_every_layer_slides_has_nothing_to_plan(capsys, tmp_path):
    db = str(tmp_path / "k.db")
    result = run_cli(
        capsys, "run", "kv-cache-plan", "-m", "tiny-mistral", "--db", db,
        *_params(method="random", budget=1),
    )  # fmt: skip
    _one_line_error(result, "sliding window")
    assert _stored_runs(capsys, db) == 0
