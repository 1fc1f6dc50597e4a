"""The store from the command line: which databases commands open, create or refuse,
artifact folders, run times, and removing runs."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from headscope.storage.schema import Run
from headscope.storage.store import Store

from helpers.cli import run_cli
from helpers.readonly import read_only

TINY_RUN = ("run", "head-detector", "-m", "tiny-llama", "-p", "n_random=1", "-f", "json")


def tiny_run(capsys, db, random_length: int = 4) -> dict:
    result = run_cli(capsys, *TINY_RUN, "-p", f"random_length={random_length}", "--db", db)
    assert result.code == 0, result.err
    return result.json()


def one_line_error(result, *expected: str) -> None:
    assert result.code == 1
    assert result.err.count("\n") == 1 and "Traceback" not in result.err, result.err
    for text in expected:
        assert text in result.err, result.err


def test_two_databases_in_one_folder_keep_their_own_artifacts(capsys, tmp_path):
    main = tiny_run(capsys, str(tmp_path / "main.db"))
    plots = {a["path"]: Path(a["path"]).read_bytes() for a in main["artifacts"]}
    second = tiny_run(capsys, str(tmp_path / "second.db"), random_length=8)
    assert main["run"]["id"] == second["run"]["id"] == 1
    second_paths = {a["path"] for a in second["artifacts"]}
    assert len(plots) == len(second_paths) == 4 and not second_paths & set(plots)
    assert {path: Path(path).read_bytes() for path in plots} == plots
    assert all(Path(path).exists() for path in second_paths)
    shown = run_cli(capsys, "runs", "show", "1", "-f", "json", "--db", str(tmp_path / "main.db"))
    assert [a["path"] for a in shown.json()["artifacts"]] == list(plots)


def test_run_times_carry_the_utc_offset(capsys, tmp_path):
    db = str(tmp_path / "t.db")
    document = tiny_run(capsys, db)
    listed = run_cli(capsys, "runs", "list", "-f", "json", "--db", db).json()["runs"][0]
    exported = json.loads(run_cli(capsys, "runs", "export", "1", "--db", db).out)["run"]
    for run in (document["run"], listed, exported):
        for key in ("created_at", "started_at", "finished_at"):
            assert run[key].endswith("+00:00"), (key, run[key])
            assert datetime.fromisoformat(run[key]).utcoffset() == timedelta(0)


def test_reading_commands_never_create_a_database(capsys, tmp_path):
    db = tmp_path / "typo" / "mian.db"
    for args in [
        ("runs", "list"),
        ("runs", "show", "1"),
        ("runs", "export", "1"),
        ("runs", "compare", "1", "2"),
        ("plot", "1", "-o", str(tmp_path / "p.png")),
        ("runs", "cancel", "1"),
        ("runs", "delete", "1"),
        ("runs", "prune", "--status", "failed"),
        ("steer", "The cat sat", "-c", "cat", "-p", "from_run=1", "-m", "tiny-llama"),
    ]:
        one_line_error(run_cli(capsys, *args, "--db", str(db)), f"no database at {db}")
    where = run_cli(capsys, "db", "path", "-f", "json", "--db", str(db)).json()
    assert where == {"url": f"sqlite:///{db}", "path": str(db), "exists": False}
    assert not (tmp_path / "typo").exists()


def test_db_path_prints_the_url_and_the_file(capsys, tmp_path):
    db = tmp_path / "d.db"
    table = run_cli(capsys, "db", "path", "--db", str(db))
    assert f"url:  sqlite:///{db}" in table.out
    assert f"path: {db} (no database there yet)" in table.out
    assert run_cli(capsys, "db", "upgrade", "--db", str(db)).code == 0
    assert f"path: {db}\n" in run_cli(capsys, "db", "path", "--db", str(db)).out
    default = run_cli(capsys, "db", "path", "-f", "json").json()
    assert default["url"] == f"sqlite:///{default['path']}"
    assert default["path"].endswith("headscope.db") and default["exists"] is False


def test_a_database_with_other_tables_is_refused_and_left_alone(capsys, tmp_path):
    db = tmp_path / "notes.db"
    connection = sqlite3.connect(db)
    connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    connection.commit()
    connection.close()
    before = db.read_bytes()
    for args in [TINY_RUN, ("runs", "list"), ("db", "upgrade"), ("runs", "delete", "1")]:
        result = run_cli(capsys, *args, "--db", str(db))
        one_line_error(result, f"{db} is not a headscope database", "notes")
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_a_read_only_database_is_read_and_refused_for_writing(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "shared"
    db = folder / "r.db"
    tiny_run(capsys, str(db))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for target in (db, folder):  # a read-only file, then a read-only mount
        with read_only(target), monkeypatch.context() as patched:
            patched.setattr("headscope.core.models.load_spec", no_model)
            for args in [TINY_RUN, ("runs", "delete", "1"), ("runs", "cancel", "1")]:
                one_line_error(run_cli(capsys, *args, "--db", str(db)), f"{db} is read-only")
            listed = run_cli(capsys, "runs", "list", "-f", "json", "--db", str(db))
            assert listed.code == 0 and listed.json()["total"] == 1, listed.err
            shown = run_cli(capsys, "runs", "show", "1", "--db", str(db))
            assert shown.code == 0 and "heads by induction" in shown.out
            plot = tmp_path / f"{target.name}.png"
            assert run_cli(capsys, "plot", "1", "-o", str(plot), "--db", str(db)).code == 0


# -- runs delete, runs prune ----------------------------------------------------------------
@pytest.fixture
def three_runs(capsys, tmp_path):
    """Runs 1 (succeeded, 40 days old), 2 (failed) and 3 (succeeded), each with plots."""
    db = str(tmp_path / "p.db")
    documents = [tiny_run(capsys, db) for _ in range(3)]
    store = Store(db)
    with store.session() as session, session.begin():
        session.get(Run, 1).created_at = datetime.now(UTC) - timedelta(days=40)
        session.get(Run, 2).status = "failed"
    store.engine.dispose()
    return db, {d["run"]["id"]: [a["path"] for a in d["artifacts"]] for d in documents}


def listed_ids(capsys, db) -> list[int]:
    runs = run_cli(capsys, "runs", "list", "-f", "json", "--db", db).json()["runs"]
    return sorted(r["id"] for r in runs)


def test_runs_delete_removes_the_runs_with_their_files(capsys, three_runs):
    db, plots = three_runs
    result = run_cli(capsys, "runs", "delete", "1", "3", "--db", db)
    assert result.code == 0, result.err
    assert "removed run 1: head-detector on tiny-llama" in result.out
    assert "removed 2 runs and 8 files" in result.out
    assert all(path in result.out for path in plots[1] + plots[3])
    assert listed_ids(capsys, db) == [2]
    assert not any(Path(p).exists() for p in plots[1] + plots[3])
    assert all(Path(p).exists() for p in plots[2])
    one_line_error(run_cli(capsys, "runs", "delete", "2", "7", "--db", db), "no run with id 7")
    assert listed_ids(capsys, db) == [2]


def test_runs_delete_refuses_unfinished_runs_unless_forced(capsys, three_runs):
    db, _ = three_runs
    store = Store(db)
    queued = store.create_run("head-detector", "1", "tiny-llama", {}, seed=0)
    store.engine.dispose()
    one_line_error(run_cli(capsys, "runs", "delete", "3", str(queued), "--db", db), "is queued")
    assert listed_ids(capsys, db) == [1, 2, 3, queued]
    forced = run_cli(capsys, "runs", "delete", str(queued), "--force", "-f", "json", "--db", db)
    assert [r["run"]["id"] for r in forced.json()["runs"]] == [queued]
    assert listed_ids(capsys, db) == [1, 2, 3]


def test_runs_prune_by_status_age_and_analysis(capsys, three_runs):
    db, plots = three_runs
    dry = run_cli(
        capsys, "runs", "prune", "--status", "failed", "--dry-run", "-f", "json", "--db", db
    )
    planned = dry.json()
    assert planned["dry_run"] is True and [r["run"]["id"] for r in planned["runs"]] == [2]
    assert sorted(planned["runs"][0]["files"]) == sorted(plots[2])
    assert listed_ids(capsys, db) == [1, 2, 3] and all(Path(p).exists() for p in plots[2])

    pruned = run_cli(capsys, "runs", "prune", "--status", "failed", "--db", db)
    assert "removed run 2" in pruned.out and "removed 1 run and 4 files" in pruned.out
    aged = run_cli(capsys, "runs", "prune", "--older-than", "30", "-f", "json", "--db", db)
    assert [r["run"]["id"] for r in aged.json()["runs"]] == [1]
    other = run_cli(capsys, "runs", "prune", "--analysis", "retrieval-heads", "--db", db)
    assert "removed 0 runs" in other.out
    assert listed_ids(capsys, db) == [3]
    everything = run_cli(capsys, "runs", "prune", "--analysis", "head-detector", "--db", db)
    assert "removed run 3" in everything.out and listed_ids(capsys, db) == []


def test_runs_prune_needs_a_filter_and_known_statuses(capsys, three_runs):
    db, _ = three_runs
    one_line_error(run_cli(capsys, "runs", "prune", "--db", db), "say which runs to prune")
    one_line_error(
        run_cli(capsys, "runs", "prune", "--status", "faild", "--db", db), "unknown status 'faild'"
    )
    one_line_error(
        run_cli(capsys, "runs", "prune", "--older-than", "-1", "--db", db), "cannot be negative"
    )
    assert listed_ids(capsys, db) == [1, 2, 3]
