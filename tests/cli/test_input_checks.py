"""Bad input on the command line: broken model files, numbers out of range, strict
params, checks before a run is stored. Each is a one-line error (exit 1), or a usage
error for an option out of its range (exit 2), and stores nothing."""

from __future__ import annotations

import json
import random
import shlex
from pathlib import Path

import pytest

from helpers.cli import run_cli

DOCS = Path(__file__).parents[2]
TINY_DETECTOR = ("-p", "n_random=1", "-p", "random_length=6", "-p", "repeats=2")


def stored_runs(capsys, db: str) -> int:
    """Runs in the database; none when a refused request did not even create it."""
    listed = run_cli(capsys, "runs", "list", "-f", "json", "--db", db)
    if listed.code == 1 and "no database at" in listed.err:
        return 0
    return listed.json()["total"]


def detector_run(capsys, db: str, model: str = "tiny-llama") -> int:
    result = run_cli(
        capsys, "run", "head-detector", "-m", model, *TINY_DETECTOR, "-f", "json", "--db", db
    )
    assert result.code == 0, result.err
    return result.json()["run"]["id"]


def assert_one_line_error(result, expected: str) -> None:
    assert result.code == 1, (result.code, result.err)
    assert "Traceback" not in result.err + result.out
    lines = [line for line in result.err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and expected in lines[0], result.err


@pytest.fixture
def broken_models(tmp_path) -> dict[str, tuple[Path, str]]:
    """Model files that cannot be a model, with what their error says."""
    noise = random.Random(0).randbytes(4096)
    not_gguf = tmp_path / "c.gguf"
    not_gguf.write_bytes(noise)
    damaged_gguf = tmp_path / "damaged.gguf"
    damaged_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + noise[:7])
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    return {
        "not_gguf": (not_gguf, "c.gguf is not a GGUF file"),
        "bad_config": (bad_config, "bad-config/config.json is not JSON"),
        "no_weights": (no_weights, "no-weights has no weights"),
        "damaged_gguf": (damaged_gguf, "damaged.gguf could not be read as a model"),
    }


def test_broken_model_files_are_one_line_errors(capsys, tmp_path, broken_models):
    db = str(tmp_path / "m.db")
    for name, (path, expected) in broken_models.items():
        commands = [
            ("run", "head-detector", "-m", str(path), "--db", db),
            ("models", "info", str(path)),
        ]
        if name != "damaged_gguf":  # found at once, before any conversion
            commands.append(("models", "pull", str(path)))
        for args in commands:
            assert_one_line_error(run_cli(capsys, *args), expected)
    assert stored_runs(capsys, db) == 0


def test_damaged_weights_are_a_one_line_error(capsys, tmp_path):
    directory = tmp_path / "damaged-weights"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "model.safetensors").write_bytes(random.Random(1).randbytes(256))
    db = str(tmp_path / "w.db")
    result = run_cli(capsys, "run", "head-detector", "-m", str(directory), "--db", db)
    assert_one_line_error(result, "damaged-weights could not be loaded")
    assert stored_runs(capsys, db) == 0


def test_numbers_out_of_range_are_usage_errors_and_store_nothing(capsys, tmp_path):
    db = str(tmp_path / "n.db")
    run_id = str(detector_run(capsys, db))
    for args in [
        ("run", "head-detector", "-m", "tiny-llama", *TINY_DETECTOR, "--seed", "-1"),
        ("run", "head-detector", "-m", "tiny-llama", *TINY_DETECTOR, "--seed", str(2**64)),
        ("runs", "show", "99999999999999999999"),
        ("runs", "show", "0"),
        ("runs", "export", str(2**63)),
        ("plot", str(2**63)),
        ("runs", "cancel", "0"),
        ("runs", "show", run_id, "--top", "-5"),
        ("runs", "compare", run_id, run_id, "--bands", "0"),
        ("runs", "compare", run_id, run_id, "--bands", "13"),
        ("runs", "compare", run_id, run_id, "--top-k", "0"),
        ("runs", "list", "--limit", "-1"),
        ("runs", "list", "--offset", "-1"),
        ("runs", "list", "--offset", str(2**63)),
        ("runs", "list", "--status", "bogus"),
        ("tasks", "show", "ioi", "-m", "tiny-llama", "--seed", "-1"),
    ]:
        result = (
            run_cli(capsys, *args, "--db", db) if args[0] != "tasks" else run_cli(capsys, *args)
        )
        assert result.code == 2, (args, result.code, result.err)
        assert "Invalid value" in result.err and "Traceback" not in result.err, args
    assert stored_runs(capsys, db) == 1
    assert run_cli(capsys, "runs", "list", "--status", "succeeded", "--db", db).code == 0


def test_a_model_name_longer_than_the_store_keeps_is_refused(capsys, tmp_path):
    db = str(tmp_path / "l.db")
    result = run_cli(capsys, "run", "head-detector", "-m", "x" * 5000, "--db", db)
    assert_one_line_error(result, "longer than 200")
    assert_one_line_error(run_cli(capsys, "models", "info", "x" * 5000), "File name too long")
    assert stored_runs(capsys, db) == 0


def test_runs_show_with_an_unknown_metric_lists_the_runs_metrics(capsys, tmp_path):
    db = str(tmp_path / "s.db")
    run_id = str(detector_run(capsys, db))
    for form in ("table", "json"):
        result = run_cli(
            capsys, "runs", "show", run_id, "--metric", "bogus", "-f", form, "--db", db
        )
        assert_one_line_error(result, "run 1 has no head metric 'bogus'; it has: duplicate_token")
    shown = run_cli(capsys, "runs", "show", run_id, "--metric", "previous_token", "--db", db)
    assert shown.code == 0 and "heads by previous_token" in shown.out
    assert_one_line_error(
        run_cli(capsys, "runs", "show", "42", "--metric", "x", "--db", db), "no run with id 42"
    )


def test_analysis_params_are_strict(capsys, tmp_path):
    db = str(tmp_path / "p.db")
    for value in ("true", '"3"', "2.0"):
        args = ("-p", f"n_random={value}", "-p", "random_length=6", "-p", "repeats=2")
        result = run_cli(capsys, "run", "head-detector", "-m", "tiny-llama", *args, "--db", db)
        assert_one_line_error(result, "n_random: Input should be a valid integer")
    params = tmp_path / "p.json"
    params.write_text(json.dumps({"n_random": 1, "random_length": 6.0}))
    result = run_cli(
        capsys, "run", "head-detector", "-m", "tiny-llama", "--params", str(params), "--db", db
    )
    assert_one_line_error(result, "random_length: Input should be a valid integer")
    assert stored_runs(capsys, db) == 0


def test_a_json_list_is_a_tuple(capsys, tmp_path):
    """Not coercion: `-p heads=[[2,1]]` is JSON, and JSON has no tuples."""
    result = run_cli(
        capsys,
        "run",
        "attention-modulation",
        "-m",
        "tiny-llama",
        *("-p", "selection=list", "-p", "heads=[[2,1],[2,3]]", "-p", "controls=false"),
        *("-p", "generate=false", "-p", "n_examples=4", "-p", "batch_size=4"),
        *("-f", "json", "--db", str(tmp_path / "t.db")),
    )
    assert result.code == 0, result.err
    assert result.json()["run"]["params"]["heads"] == [[2, 1], [2, 3]]


def _documented_runs() -> list[tuple[str, str, list[str]]]:
    """Every `headscope run NAME ... -p k=v` in README.md and docs/*.md."""
    found = []
    for path in [DOCS / "README.md", *sorted((DOCS / "docs").glob("*.md"))]:
        for line in path.read_text().splitlines():
            if "headscope run " not in line or " -p " not in line:
                continue
            command = line.split("headscope run ", 1)[1].split("`")[0].split("#")[0]
            words = shlex.split(command)
            pairs = [words[i + 1] for i, word in enumerate(words) if word in ("-p", "--param")]
            found.append((path.name, words[0], pairs))
    return found


def test_documented_cli_params_still_validate():
    from headscope.cli import parse_param_pairs
    from headscope.core import jobs
    from headscope.core.plugins import build_registry

    registry = build_registry()
    documented = _documented_runs()
    assert {name for _, name, _ in documented} >= {
        "retrieval-heads",
        "attention-modulation",
        "head-patching",
        "sae-circuit",
    }
    for _, name, pairs in documented:
        jobs.prepare(registry, name, "tiny-llama", parse_param_pairs(pairs))  # raises if not


def test_checks_before_the_run_is_stored(capsys, tmp_path):
    db = str(tmp_path / "c.db")
    run_id = str(detector_run(capsys, db))
    for args, expected in [
        (
            ("sae-circuit", "-p", "reference=auto", "-p", "reference_top_k=15"),
            "reference_top_k: 15 is not below tiny-llama's 12 heads",
        ),
        (
            ("sae-circuit", "-p", f"reference={run_id}", "-p", "reference_top_k=12"),
            "12 is not below",
        ),
        (("sae-circuit", "-p", "reference=99"), "reference: no run with id 99"),
        (("attention-modulation", "-p", "from_run=99"), "from_run: no run with id 99"),
        (
            ("attention-modulation", "-p", f"from_run={run_id}"),
            "no head scores named 'answer_context_mass'",
        ),
        (("retrieval-heads", "-p", "scores_from=99"), "scores_from: no run with id 99"),
        (
            ("retrieval-heads", "-p", f"scores_from={run_id}"),
            "no head scores named 'retrieval_score'",
        ),
    ]:
        result = run_cli(capsys, "run", *args, "-m", "tiny-llama", "--db", db)
        assert_one_line_error(result, expected)
    other = run_cli(
        capsys, "run", "sae-circuit", "-p", f"reference={run_id}", "-m", "tiny-gpt2", "--db", db
    )
    assert_one_line_error(other, f"reference: run {run_id} is on tiny-llama, not tiny-gpt2")
    assert stored_runs(capsys, db) == 1


def test_a_run_that_failed_is_no_reference(capsys, tmp_path):
    db = str(tmp_path / "f.db")
    from headscope.storage.store import Store

    run_id = detector_run(capsys, db)
    Store(db).fail_run(run_id, "broken on purpose")
    result = run_cli(
        capsys,
        "run",
        "retrieval-heads",
        "-p",
        f"scores_from={run_id}",
        "-m",
        "tiny-llama",
        "--db",
        db,
    )
    assert_one_line_error(result, f"scores_from: run {run_id} failed: it has no results")
    assert stored_runs(capsys, db) == 1


def test_compare_refuses_runs_of_different_shapes(capsys, tmp_path):
    db = str(tmp_path / "k.db")
    llama, qwen = detector_run(capsys, db, "tiny-llama"), detector_run(capsys, db, "tiny-qwen2")
    result = run_cli(capsys, "runs", "compare", str(llama), str(qwen), "--db", db)
    assert_one_line_error(result, "3 layers x 4 heads")
    assert "2 x 4: head sets of different shapes do not compare" in result.err
    assert run_cli(capsys, "runs", "compare", str(llama), str(llama), "--db", db).code == 0


def test_describe_shows_choices_bounds_and_brackets(capsys, monkeypatch):
    from headscope import cli

    monkeypatch.setattr(cli.console, "width", 300)
    result = run_cli(capsys, "analyses", "describe", "attention-modulation")
    assert result.code == 0, result.err
    rows = {
        line.split("│")[1].strip(): line for line in result.out.splitlines() if line.count("│") > 4
    }
    assert "top_k | threshold | list | all" in rows["selection"]
    assert "paint | pasta" in rows["form"]
    assert ">= 1, <= 10000" in rows["top_k"]
    assert "> 0, <= 1" in rows["pasta_coefficient"]
    assert "[[layer, head], ...]." in rows["heads"]
    assert "list of [integer, integer] or null" in rows["heads"]
