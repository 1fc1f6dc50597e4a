"""The command line end to end on a tiny model: run, show, export, plot, errors."""

from __future__ import annotations

import csv
import io

from helpers.cli import run_cli


def test_run_show_export_and_plot_agree(capsys, tmp_path):
    db = str(tmp_path / "cli.db")
    result = run_cli(
        capsys,
        "run",
        "head-detector",
        "--model",
        "tiny-gpt2",
        "--format",
        "json",
        "--param",
        "n_random=2",
        "--param",
        "random_length=8",
        "--db",
        db,
    )
    assert result.code == 0, result.err
    document = result.json()
    run_id = document["run"]["id"]
    assert document["run"]["status"] == "succeeded"
    assert len(document["head_scores"]) == 3 * 4 * 4  # layers x heads x metrics
    assert document["run"]["params"]["n_random"] == 2

    shown = run_cli(capsys, "runs", "show", str(run_id), "--format", "json", "--db", db).json()
    exported = run_cli(capsys, "runs", "export", str(run_id), "--format", "csv", "--db", db)
    rows = list(csv.DictReader(io.StringIO(exported.out)))
    from_csv = {(int(r["layer"]), int(r["head"]), r["metric"]): float(r["value"]) for r in rows}
    from_show = {(r["layer"], r["head"], r["metric"]): r["value"] for r in shown["head_scores"]}
    from_run = {(r["layer"], r["head"], r["metric"]): r["value"] for r in document["head_scores"]}
    assert from_csv == from_show == from_run

    png = tmp_path / "heat.png"
    plotted = run_cli(capsys, "plot", str(run_id), "-o", str(png), "--db", db)
    assert plotted.code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = run_cli(capsys, "runs", "show", str(run_id), "--db", db)
    assert "heads by induction" in table.out
    listed = run_cli(capsys, "runs", "list", "--format", "json", "--db", db).json()
    assert listed["total"] == 1 and listed["runs"][0]["id"] == run_id


def test_params_file_and_json_values(capsys, tmp_path):
    params = tmp_path / "p.json"
    params.write_text('{"n_random": 1, "prompts": ["hello there"]}')
    result = run_cli(
        capsys,
        "run",
        "head-detector",
        "-m",
        "tiny-llama",
        "--params",
        str(params),
        "-p",
        "random_length=5",
        "-f",
        "json",
        "--db",
        str(tmp_path / "x.db"),
    )
    assert result.code == 0, result.err
    assert result.json()["run"]["params"]["prompts"] == ["hello there"]
    assert result.json()["run"]["params"]["random_length"] == 5


def test_invalid_params_print_the_validation_error_without_traceback(capsys, tmp_path):
    db = str(tmp_path / "e.db")
    result = run_cli(
        capsys, "run", "head-detector", "-m", "tiny-llama", "-p", "n_random=-3", "--db", db
    )
    assert result.code == 1
    assert "n_random" in result.err and "greater than or equal to 1" in result.err
    assert "Traceback" not in result.err + result.out
    unknown = run_cli(
        capsys, "run", "head-detector", "-m", "tiny-llama", "-p", "bogus=1", "--db", db
    )
    assert unknown.code == 1 and "bogus" in unknown.err
    # nothing was stored for rejected requests: not even a database was made
    listed = run_cli(capsys, "runs", "list", "-f", "json", "--db", db)
    assert listed.code == 1 and "no database at" in listed.err


def test_too_long_input_is_rejected_before_a_run_is_stored(capsys, tmp_path):
    db = str(tmp_path / "e.db")
    result = run_cli(
        capsys, "run", "head-detector", "-m", "tiny-llama", "-p", "random_length=200", "--db", db
    )
    assert result.code == 1 and "exceeds tiny-llama's 512 positions" in result.err
    assert run_cli(capsys, "runs", "list", "-f", "json", "--db", db).json()["total"] == 0


def test_unknown_names_give_clear_errors(capsys, tmp_path):
    db = str(tmp_path / "e.db")
    assert run_cli(capsys, "db", "upgrade", "--db", db).code == 0
    for args, expected in [
        (("run", "nope", "-m", "tiny-llama"), "unknown analysis 'nope'"),
        (("run", "head-detector", "-m", "nope-model"), "unknown model 'nope-model'"),
        (("runs", "show", "42"), "no run with id 42"),
        (("runs", "list", "-f", "yaml"), "unknown format"),
        (("run", "head-detector", "-m", "tiny-llama", "-p", "oops"), "not key=value"),
    ]:
        result = run_cli(capsys, *args, "--db", db)
        assert result.code == 1, args
        assert expected in result.err, (args, result.err)
        assert "Traceback" not in result.err


def test_every_command_has_help(capsys):
    for args in (
        ["--help"],
        ["run", "--help"],
        ["runs", "--help"],
        ["runs", "show", "--help"],
        ["runs", "export", "--help"],
        ["runs", "compare", "--help"],
        ["plot", "--help"],
        ["db", "path", "--help"],
        ["db", "upgrade", "--help"],
        ["plugins", "--help"],
        ["models", "info", "--help"],
        ["analyses", "describe", "--help"],
    ):
        result = run_cli(capsys, *args)
        assert result.code == 0 and "Usage" in result.out, args


def test_db_path_and_upgrade(capsys, tmp_path):
    db = tmp_path / "d.db"
    path = run_cli(capsys, "db", "path", "-f", "json", "--db", str(db)).json()
    assert path["path"] == str(db)
    upgraded = run_cli(capsys, "db", "upgrade", "-f", "json", "--db", str(db)).json()
    assert upgraded["after"] is not None
    again = run_cli(capsys, "db", "upgrade", "-f", "json", "--db", str(db)).json()
    assert again["before"] == again["after"]


def test_compare_two_runs(capsys, tmp_path):
    db = str(tmp_path / "c.db")
    ids = []
    for seed in (1, 2):
        out = run_cli(
            capsys,
            "run",
            "head-detector",
            "-m",
            "tiny-llama",
            "--seed",
            str(seed),
            "-p",
            "n_random=1",
            "-p",
            "random_length=6",
            "-f",
            "json",
            "--db",
            db,
        )
        ids.append(out.json()["run"]["id"])
    result = run_cli(
        capsys,
        "runs",
        "compare",
        str(ids[0]),
        str(ids[1]),
        "--top-k",
        "3",
        "--metric",
        "previous_token",
        "-f",
        "json",
        "--db",
        db,
    ).json()
    # previous_token comes from the natural prompts, identical across seeds
    assert result["jaccard"] == 1.0 and result["overlap_coefficient"] == 1.0
    assert sum(b["size_a"] for b in result["bands"]) == 3


def test_analyses_describe_shows_params(capsys):
    result = run_cli(capsys, "analyses", "describe", "head-detector", "-f", "json").json()
    assert "random_length" in result["params_schema"]["properties"]


def test_cli_reference_is_in_step_with_the_code(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    generated = tmp_path / "cli.md"
    typer = Path(sys.executable).parent / "typer"
    subprocess.run(
        [
            str(typer),
            "--app",
            "full_app",
            "headscope.cli",
            "utils",
            "docs",
            "--name",
            "headscope",
            "--title",
            "headscope CLI reference",
            "--output",
            str(generated),
        ],
        check=True,
        capture_output=True,
    )
    committed = Path(__file__).parents[2] / "docs" / "cli.md"
    assert generated.read_text() == committed.read_text(), "run `make docs`"
