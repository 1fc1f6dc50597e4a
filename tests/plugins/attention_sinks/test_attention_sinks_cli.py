"""attention-sinks end to end through the CLI on a tiny model, with a user task."""

from __future__ import annotations

import pytest

from helpers.cli import run_cli
from helpers.tasks import write_task_file

# Byte-level tiny models: answers are single characters; corruptions keep the length.
ROWS = [
    ("the cat sat on the mat and the cat", " ", "x", "the dog sat on the mat and the dog"),
    ("abc abc abc ab", "c", "d", "abd abe abf ab"),
    ("one two one two one tw", "o", "e", "one tqo ont twe oni tw"),
    ("red blue red blue red blu", "e", "a", "red blue rod blue rud blu"),
    ("x y x y x", " ", "z", "x y z y w"),
    ("hello hello hell", "o", "a", "hello jello hell"),
    ("1 2 3 1 2 3 1 2", " ", "4", "1 2 3 4 5 6 7 8"),
    ("aaa bbb aaa bb", "b", "a", "aaa bbb ccc bb"),
]


@pytest.fixture
def task_file(tmp_path):
    return write_task_file(tmp_path / "task.jsonl", ROWS)


def _run(capsys, db, *args):
    return run_cli(capsys, "run", "attention-sinks", "-m", "tiny-llama", *args, "--db", db)


def test_calibration_is_chosen_on_one_split_and_measured_on_the_other(capsys, tmp_path, task_file):
    db = str(tmp_path / "s.db")
    result = _run(
        capsys, db, "-p", f"task=jsonl:{task_file}", "-p", "min_layer=0", "-p", "threshold=0.05",
        "-p", "random_draws=2", "-p", "bootstrap=200", "--format", "json",
    )  # fmt: skip
    assert result.code == 0, result.err
    document = result.json()
    metrics = document["metrics"]
    assert metrics["calibration_examples"] + metrics["held_out_examples"] == len(ROWS)
    gains = {
        (r["layer"], r["head"]): r["value"]
        for r in document["head_scores"]
        if r["metric"] == "calibration_gain"
    }
    selected = {
        (r["layer"], r["head"])
        for r in document["head_scores"]
        if r["metric"] == "selected" and r["value"] == 1
    }
    assert len(gains) == 3 * 4
    assert selected == {h for h, g in gains.items() if g > 0}  # min_gain 0
    assert metrics["selected_heads"] == len(selected)
    for setting in ("baseline", "all_heads"):
        assert 0 <= metrics[f"{setting}.accuracy"] <= 1
        assert metrics[f"{setting}.perplexity"] > 1
    if selected:
        for name in ("calibrated.gain_accuracy", "calibrated.gain_metric"):
            assert metrics[f"{name}_low"] <= metrics[name] <= metrics[f"{name}_high"]
        assert metrics["calibrated.gain_metric"] == pytest.approx(
            metrics["calibrated.metric"] - metrics["baseline.metric"]
        )
        controls = document["run"]["summary"]["controls"]
        for heads in controls.values():
            assert not {tuple(h) for h in heads} & selected
    shown = run_cli(capsys, "runs", "show", str(document["run"]["id"]), "--db", db)
    assert "uncalibrated vs calibrated" in shown.out


def test_no_sink_above_the_threshold_means_no_head_is_calibrated(capsys, tmp_path, task_file):
    db = str(tmp_path / "n.db")
    result = _run(
        capsys, db, "-p", f"task=jsonl:{task_file}", "-p", "threshold=0.99", "-p", "min_layer=0",
        "--format", "json",
    )  # fmt: skip
    assert result.code == 0, result.err
    metrics = result.json()["metrics"]
    assert metrics["selected_heads"] == 0
    assert "calibrated.accuracy" not in metrics
    assert metrics["all_heads.accuracy"] == metrics["baseline.accuracy"]  # nothing to change


@pytest.mark.parametrize(
    "params,message",
    [
        (["-p", "beta=0"], "beta"),
        (["-p", "threshold=1.5"], "threshold"),
        (["-p", "min_layer=7"], "min_layer 7 out of range"),
        (["-p", "min_layer=2", "-p", "max_layer=1"], "below min_layer"),
        (["-p", "task=nonsense"], "unknown task"),
        (["-p", "n_examples=2"], "n_examples"),
    ],
)
def test_bad_params_fail_cleanly_and_store_nothing(capsys, tmp_path, params, message):
    db = str(tmp_path / "bad.db")
    assert run_cli(capsys, "db", "upgrade", "--db", db).code == 0  # listed below
    result = _run(capsys, db, *params)
    assert result.code == 1
    assert message in result.err and "Traceback" not in result.err
    listed = run_cli(capsys, "runs", "list", "--format", "json", "--db", db)
    assert listed.json()["total"] == 0
