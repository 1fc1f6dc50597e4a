"""context-heads, attention-modulation and steer through the CLI on a tiny model."""

from __future__ import annotations

import pytest

from headscope.plugins.context.attention_modulation import ModulationParams
from headscope.plugins.context.context_heads import ContextHeadsParams, calibration_split

from helpers.cli import run_cli

SMALL = ["-p", "n_examples=6", "-p", "batch_size=6"]


def _runs(capsys, db) -> int:
    return run_cli(capsys, "runs", "list", "--format", "json", "--db", db).json()["total"]


def test_context_heads_then_modulation_from_its_heads(capsys, tmp_path):
    db = str(tmp_path / "am.db")
    heads = run_cli(
        capsys, "run", "context-heads", "-m", "tiny-llama", *SMALL, "-p", "max_new_tokens=3",
        "--format", "json", "--db", db,
    )  # fmt: skip
    assert heads.code == 0, heads.err
    document = heads.json()
    metrics = {r["metric"] for r in document["head_scores"]}
    assert metrics == {"context_mass", "answer_context_mass", "lookback_ratio"}
    assert len(document["head_scores"]) == 3 * 3 * 4
    run_id = document["run"]["id"]

    steered = run_cli(
        capsys, "run", "attention-modulation", "-m", "tiny-llama", *SMALL,
        "-p", f"from_run={run_id}", "-p", "top_k=3", "-p", "min_layer=1", "-p", "max_new_tokens=2",
        "-p", "alpha=0.8", "-p", "generate=false", "-p", "random_draws=2", "--format", "json",
        "--db", db,
    )  # fmt: skip
    assert steered.code == 0, steered.err
    result = steered.json()
    assert result["run"]["status"] == "succeeded"
    metrics = result["metrics"]
    for setting in ("baseline", "modulated", "all_heads", "random_heads"):
        assert f"{setting}.faithful_prob" in metrics
        assert f"{setting}.perplexity" in metrics
    assert metrics["selected_heads"] == 3
    assert metrics["random_heads.faithful_prob"] == pytest.approx(
        (metrics["random_heads_1.faithful_prob"] + metrics["random_heads_2.faithful_prob"]) / 2
    )
    assert metrics["modulated.gain_faithful_prob"] == pytest.approx(
        metrics["modulated.faithful_prob"] - metrics["baseline.faithful_prob"]
    )
    selected = [
        (r["layer"], r["head"])
        for r in result["head_scores"]
        if r["metric"] == "selected" and r["value"] == 1
    ]
    scores = {
        (r["layer"], r["head"]): r["value"]
        for r in document["head_scores"]
        if r["metric"] == "answer_context_mass" and r["layer"] >= 1
    }
    assert set(selected) == set(sorted(scores, key=lambda h: -scores[h])[:3])
    # every gain has its bootstrap interval around it; the random draws are layer-matched
    for name in ("modulated.gain_faithful_prob", "modulated.gain_faithful_prob_per_token"):
        assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"]
    assert "modulated.gain_over_random_faithful_prob_low" in metrics
    assert metrics["random_heads.layer_matched"] in (0.0, 1.0)
    controls = result["run"]["summary"]["controls"]
    for label in ("random_heads_1", "random_heads_2"):
        assert not {tuple(h) for h in controls[label]} & set(selected)
    shown = run_cli(capsys, "runs", "show", str(result["run"]["id"]), "--db", db)
    assert "baseline vs modulated" in shown.out
    assert "95% CI" in shown.out and "layer-matched random" in shown.out

    from_run = run_cli(
        capsys, "steer", "Context: the code is 12. Question: code? Answer:", "--context",
        "the code is 12.", "-p", f"from_run={run_id}", "-p", "top_k=2", "-p", "min_layer=1",
        "-m", "tiny-llama", "-p", "max_new_tokens=3", "--format", "json", "--db", db,
    )  # fmt: skip
    assert from_run.code == 0, from_run.err
    assert len(from_run.json()["modulation"]["heads"]) == 2


def test_heads_chosen_on_examples_this_run_holds_out_are_rejected(capsys, tmp_path):
    """A seed whose held-out facts include some that seed 0's context-heads run
    chose its heads on (found from the split itself, not from the data's order)."""
    calibrated, _ = calibration_split(ContextHeadsParams(n_examples=6), 0)
    groups = {example.group for example in calibrated}
    seed = next(
        seed
        for seed in range(1, 200)
        if groups & {e.group for e in calibration_split(ModulationParams(n_examples=6), seed)[1]}
    )
    db = str(tmp_path / "overlap.db")
    heads = run_cli(
        capsys, "run", "context-heads", "-m", "tiny-llama", *SMALL, "-p", "max_new_tokens=2",
        "--format", "json", "--db", db,
    )  # fmt: skip
    run_id = heads.json()["run"]["id"]
    steered = run_cli(
        capsys, "run", "attention-modulation", "-m", "tiny-llama", *SMALL, "-p", "min_layer=1",
        "-p", f"from_run={run_id}", "--seed", str(seed), "--db", db,
    )  # fmt: skip
    assert steered.code == 1
    assert "from_run" in steered.err and "holds out" in steered.err, steered.err
    assert "Traceback" not in steered.err
    assert _runs(capsys, db) == 1  # nothing stored for the rejected run


@pytest.mark.parametrize(
    "params,message",
    [
        (["-p", "alpha=9"], "alpha"),
        (["-p", "alpha=-1"], "alpha"),
        (["-p", "selection=list"], "needs `heads`"),
        (["-p", "selection=list", "-p", "heads=[[7,0]]"], "layer 7 out of range"),
        (["-p", "min_layer=3"], "min_layer 3 out of range"),
        (["-p", "dataset=nonsense"], "unknown dataset"),
        (["-p", "n_examples=1"], "n_examples"),
        (["-p", "sink_beta=2"], "sink_beta"),
        (["-p", "metric=induction"], "other metrics need from_run"),
        (["-p", "selection=threshold"], "needs `threshold`"),
    ],
)
def test_bad_modulation_params_fail_cleanly_and_store_nothing(capsys, tmp_path, params, message):
    db = str(tmp_path / "bad.db")
    assert run_cli(capsys, "db", "upgrade", "--db", db).code == 0  # listed below
    result = run_cli(capsys, "run", "attention-modulation", "-m", "tiny-llama", *params, "--db", db)
    assert result.code == 1
    assert message in result.err and "Traceback" not in result.err
    assert _runs(capsys, db) == 0


def test_empty_and_malformed_datasets_are_clear_errors(capsys, tmp_path):
    db = str(tmp_path / "bad.db")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"context": "c", "question": "q"}\n')
    for path, message in ((empty, "has no examples"), (broken, "line 1 lacks")):
        for analysis in ("context-heads", "attention-modulation"):
            result = run_cli(
                capsys, "run", analysis, "-m", "tiny-llama", "-p", f"dataset={path}", "--db", db
            )
            assert result.code == 1 and message in result.err, result.err
    assert _runs(capsys, db) == 0


def test_steer_prints_baseline_and_steered_side_by_side(capsys):
    prompt = "Context: the sky is green today. Question: what colour is the sky? Answer:"
    table = run_cli(
        capsys, "steer", prompt, "--context", "the sky is green today.", "-p", "heads=1.0,2.3",
        "-m", "tiny-llama", "-p", "max_new_tokens=4",
    )  # fmt: skip
    assert table.code == 0, table.err
    assert "baseline" in table.out and "steered" in table.out and "2 heads" in table.out
    zero = run_cli(
        capsys, "steer", prompt, "--span", "9:32", "-p", "alpha=0", "-m", "tiny-llama",
        "-p", "max_new_tokens=6", "--format", "json",
    )  # fmt: skip
    result = zero.json()
    assert result["baseline_tokens"] == result["steered_tokens"]
    assert result["context_positions"] == list(range(9, 32))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--span", "9:500"], "outside the prompt"),
        (["--token-span", "0:999"], "outside the prompt"),
        (["--positions", "1,x"], "comma-separated"),
        (["--context", "not in it"], "does not occur"),
        (["--span", "0:4", "-p", "alpha=5"], "alpha"),
        (["--span", "0:4", "-p", "heads=[[9,0]]"], "layer 9 out of range"),
        (["--span", "0:4", "-p", "heads=one"], "LAYER.HEAD"),
        (["--span", "0:4", "-p", "form=other"], "form"),
        (["--span", "0:4", "-p", "strength=1"], "strength"),
        (["--span", "0:4", "-p", "max_layer=0"], "below min_layer"),
        ([], "mark the context"),
    ],
)
def test_steer_rejects_bad_input_in_one_line(capsys, args, message):
    result = run_cli(capsys, "steer", "Context: abc. Q?", *args, "-m", "tiny-llama")
    assert result.code == 1
    assert message in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1
