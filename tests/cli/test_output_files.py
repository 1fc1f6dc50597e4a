"""Every command that writes a file checks it first, the same way: parent folders
are created, a folder or an unwritable place is a one-line error, results of a
stored run are always printed."""

from __future__ import annotations

import json

import pytest

from helpers.cli import run_cli

TINY = ["head-detector", "-m", "tiny-llama", "-p", "n_random=1", "-p", "random_length=4"]


@pytest.fixture
def db(capsys, tmp_path):
    path = str(tmp_path / "out.db")
    result = run_cli(capsys, "run", *TINY, "--db", path)
    assert result.code == 0, result.err
    return path


def _runs(capsys, db: str) -> int:
    return run_cli(capsys, "runs", "list", "-f", "json", "--db", db).json()["total"]


def _one_line_error(result, message: str) -> None:
    assert result.code == 1
    assert message in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err


def test_export_and_plot_create_missing_folders(capsys, tmp_path, db):
    target = tmp_path / "missing" / "dir" / "x.json"
    exported = run_cli(capsys, "runs", "export", "1", "-o", str(target), "--db", db)
    assert exported.code == 0, exported.err
    assert json.loads(target.read_text())["run"]["id"] == 1
    picture = tmp_path / "new" / "heads.svg"
    plotted = run_cli(capsys, "plot", "1", "-o", str(picture), "--db", db)
    assert plotted.code == 0 and picture.read_text().startswith("<?xml")


@pytest.mark.parametrize(
    "name,message",
    [("/proc/x.png", "cannot write plot file"), ("x.xyz", "use a .png, .pdf, .svg")],
)
def test_plot_refuses_unwritable_places_and_unknown_formats(capsys, tmp_path, db, name, message):
    target = name if name.startswith("/") else str(tmp_path / name)
    _one_line_error(run_cli(capsys, "plot", "1", "-o", target, "--db", db), message)


def test_a_folder_is_never_taken_for_a_file(capsys, tmp_path, db):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    _one_line_error(run_cli(capsys, "plot", "1", "-o", str(folder), "--db", db), "is a folder")
    _one_line_error(
        run_cli(capsys, "runs", "export", "1", "-o", str(folder), "--db", db), "is a folder"
    )
    _one_line_error(
        run_cli(capsys, "run", *TINY, "--params", str(folder), "--db", db), "is a folder"
    )
    _one_line_error(run_cli(capsys, "run", *TINY, "--plot", str(folder), "--db", db), "folder")
    assert _runs(capsys, db) == 1  # nothing stored for the refused runs


def test_run_with_an_unwritable_plot_is_refused_before_it_is_stored(capsys, db):
    result = run_cli(capsys, "run", *TINY, "--plot", "/proc/x.png", "--db", db)
    _one_line_error(result, "cannot write plot file /proc/x.png")
    assert _runs(capsys, db) == 1
