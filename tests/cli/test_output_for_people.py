"""Output read by people and by tools: one line of JSON on request, progress and
tables that survive a pipe, and each number listed once."""

from __future__ import annotations

import json

from helpers.cli import run_cli, run_cli_process

TINY = ["head-detector", "-m", "tiny-llama", "-p", "n_random=1", "-p", "random_length=4"]


def test_compact_json_is_one_line(capsys, tmp_path):
    db = str(tmp_path / "c.db")
    result = run_cli(capsys, "--compact", "run", *TINY, "-f", "json", "--db", db)
    assert result.code == 0, result.err
    assert len(result.out.strip().splitlines()) == 1
    indented = run_cli(capsys, "runs", "show", "1", "-f", "json", "--db", db)
    assert json.loads(indented.out) == json.loads(result.out)
    assert len(indented.out.splitlines()) > 1


def test_progress_and_tables_survive_a_pipe(tmp_path):
    db = str(tmp_path / "p.db")
    result = run_cli_process("run", *TINY, "--db", db)  # stdout and stderr are pipes
    assert result.code == 0, result.err
    progress = [line for line in result.err.splitlines() if line.startswith("head-detector:")]
    assert progress[0].startswith("head-detector: 0%") and "100%" in progress[-1]
    assert "Loading weights" not in result.err and "it/s" not in result.err
    assert "max_previous_token" in result.out  # names are not cut to 80 columns


def test_metrics_of_a_summarised_setting_are_listed_once(capsys, tmp_path):
    db = str(tmp_path / "m.db")
    args = ["-m", "tiny-llama", "-p", "n_examples=8", "-p", "top_k=2", "-p", "min_layer=1"]
    args += ["-p", "controls=false", "-p", "generate=false", "--db", db]
    result = run_cli(capsys, "run", "attention-modulation", *args)
    assert result.code == 0, result.err
    assert "baseline vs modulated" in result.out
    assert "modulated.faithful_prob" not in result.out
    assert "more metrics per setting" in result.out
    assert "selected_heads" in result.out
