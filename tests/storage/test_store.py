"""The findings store: migrations, the run lifecycle, queries and exports.

Tests taking `db_url` run once on SQLite and once on a real PostgreSQL server.
"""

from __future__ import annotations

import math
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy
import sqlalchemy.exc
from sqlalchemy import create_engine, event, inspect

from headscope.core.errors import HeadscopeError, RunNotFoundError
from headscope.core.runs import run_document
from headscope.storage.db import current_revision, head_revision, upgrade
from headscope.storage.export import head_scores_csv
from headscope.storage.schema import Run
from headscope.storage.store import Store

from helpers.readonly import read_only


def new_run(store, analysis="a", model="m", params=None):
    return store.create_run(analysis, "1", model, params or {"x": 1}, seed=3, plugin="p")


def test_schema_is_created_by_migrations_and_upgrade_is_idempotent(db_url):
    store = Store(db_url)
    assert current_revision(store.engine) == head_revision()
    tables = set(inspect(store.engine).get_table_names())
    assert {
        "runs",
        "head_scores",
        "run_metrics",
        "artifacts",
        "models",
        "alembic_version",
    } <= tables
    assert upgrade(store.engine) == (head_revision(), head_revision())


def test_a_sqlite_file_is_in_wal_mode(tmp_path):
    Store(f"sqlite:///{tmp_path / 'f.db'}")
    mode = sqlite3.connect(tmp_path / "f.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_bare_path_and_env_var_select_the_database(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_DB", str(tmp_path / "env.db"))
    assert Store().path == tmp_path / "env.db"
    assert Store(str(tmp_path / "explicit.db")).path == tmp_path / "explicit.db"


def test_run_lifecycle_writes_findings_in_one_go(db_url):
    store = Store(db_url)
    run_id = new_run(store)
    assert store.get_run(run_id).status == "queued"
    store.mark_running(run_id, None, "rev")
    assert store.update_progress(run_id, 1, 4, "one") is False
    scores = [(0, 0, "s", 0.5), (0, 1, "s", 0.25), (1, 0, "s", 0.75)]
    store.finish_run(run_id, scores, {"acc": 0.9}, summary={"k": 1})
    run = store.get_run(run_id)
    assert run.status == "succeeded" and run.duration_seconds is not None
    assert store.metrics(run_id) == {"acc": 0.9}
    top = store.top_heads("s", run_id=run_id, limit=2)
    assert [(r["layer"], r["head"], r["value"]) for r in top] == [(1, 0, 0.75), (0, 0, 0.5)]


def test_a_failed_finalisation_leaves_nothing_half_written(db_url):
    store = Store(db_url)
    good = new_run(store)
    store.finish_run(good, [(0, 0, "s", 1.0)], {"m": 1.0})
    bad = new_run(store)
    duplicate = [(0, 0, "s", 1.0), (0, 0, "s", 2.0)]  # violates the primary key
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        store.finish_run(bad, duplicate, {"m": 2.0})
    assert store.head_scores(bad) == [] and store.metrics(bad) == {}
    assert store.get_run(bad).status == "queued"
    assert store.head_scores(good) == [{"layer": 0, "head": 0, "metric": "s", "value": 1.0}]


def test_failure_records_the_error_and_keeps_other_runs(db_url):
    store = Store(db_url)
    first = new_run(store)
    store.finish_run(first, [(0, 0, "s", 1.0)], {})
    second = new_run(store)
    store.fail_run(second, "it broke")
    assert store.get_run(second).status == "failed"
    assert store.get_run(second).error == "it broke"
    assert store.get_run(first).status == "succeeded"


def test_cancel_and_missing_runs(db_url):
    store = Store(db_url)
    queued = new_run(store)
    assert store.request_cancel(queued) == "cancelled"
    running = new_run(store)
    store.mark_running(running, None, None)
    assert store.request_cancel(running) == "running"
    assert store.update_progress(running, 1, 2, "x") is True
    with pytest.raises(RunNotFoundError):
        store.get_run(999)


def test_runs_of_dead_processes_are_marked_interrupted(db_url):
    store = Store(db_url)
    run_id = new_run(store)
    store.mark_running(run_id, None, None)
    with store.session() as session, session.begin():
        from headscope.storage.schema import Run

        session.get(Run, run_id).owner_pid = 2**22 + 12345  # no such process
    assert store.mark_interrupted() == [run_id]
    assert store.get_run(run_id).status == "interrupted"


def test_export_csv_and_json_carry_the_same_numbers(db_url):
    store = Store(db_url)
    run_id = new_run(store)
    store.finish_run(run_id, [(0, 1, "s", 1 / 3), (2, 0, "t", 2 / 7)], {"m": 0.5})
    document = run_document(store, run_id)
    lines = head_scores_csv(store, run_id).strip().splitlines()
    assert lines[0] == "run_id,layer,head,metric,value"
    from_csv = {
        (int(layer), int(h), m): float(v) for _, layer, h, m, v in (x.split(",") for x in lines[1:])
    }
    from_json = {(r["layer"], r["head"], r["metric"]): r["value"] for r in document["head_scores"]}
    assert from_csv == from_json


def test_unversioned_tables_are_not_touched(db_url):
    with create_engine(db_url).begin() as connection:
        connection.exec_driver_sql("CREATE TABLE runs (id INTEGER PRIMARY KEY)")
    with pytest.raises(HeadscopeError, match="no migration record"):
        Store(db_url)
    assert inspect(create_engine(db_url)).get_table_names() == ["runs"]


def test_a_corrupt_database_file_is_a_clear_error(tmp_path):
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(HeadscopeError, match="cannot open database"):
        Store(str(path))
    assert path.read_bytes().startswith(b"this is not a database")


# -- opening: foreign, missing and read-only databases ------------------------------------
def test_a_database_with_other_tables_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    connection.commit()
    connection.close()
    before = path.read_bytes()
    for mode in ("create", "write", "read"):
        with pytest.raises(HeadscopeError, match=f"{path} is not a headscope database"):
            Store(str(path), mode=mode)
    assert path.read_bytes() == before
    assert not (tmp_path / "artifacts").exists()


def test_a_missing_database_is_created_only_by_writers(tmp_path):
    path = tmp_path / "typo" / "mian.db"
    for mode in ("read", "write"):
        with pytest.raises(HeadscopeError, match=f"no database at {path}"):
            Store(str(path), mode=mode)
    assert not (tmp_path / "typo").exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(HeadscopeError, match="no database at .*empty"):
        Store(str(empty), mode="read")
    assert Store(str(path), mode="create").list_runs() == []


def test_a_read_only_database_is_read_and_never_written(tmp_path):
    folder = tmp_path / "shared"
    store = Store(str(folder / "f.db"))
    run_id = new_run(store)
    store.finish_run(run_id, [(0, 0, "s", 0.5)], {"m": 1.0})
    store.engine.dispose()
    for target in (folder / "f.db", folder):  # the file, then the whole folder (a mount)
        with read_only(target):
            for mode in ("create", "write"):
                with pytest.raises(
                    HeadscopeError, match=f"database {folder / 'f.db'} is read-only"
                ):
                    Store(str(folder / "f.db"), mode=mode)
            reader = Store(str(folder / "f.db"), mode="read")
            assert reader.read_only
            assert reader.get_run(run_id).status == "succeeded"
            assert reader.head_scores(run_id) == [
                {"layer": 0, "head": 0, "metric": "s", "value": 0.5}
            ]
            reader.engine.dispose()
    with read_only(folder):
        with pytest.raises(HeadscopeError, match="its folder is read-only"):
            Store(str(folder / "new.db"))


def test_run_times_read_back_in_utc_with_the_offset(tmp_path):
    store = Store(str(tmp_path / "f.db"))
    run_id = new_run(store)
    store.mark_running(run_id, None, None)
    store.finish_run(run_id, [], {})
    stored = sqlite3.connect(tmp_path / "f.db").execute("SELECT created_at FROM runs").fetchone()
    assert "+" not in stored[0]  # SQLite keeps no offset
    run = store.get_run(run_id)
    for value in (run.created_at, run.started_at, run.finished_at):
        assert value.utcoffset() == timedelta(0)
    for key in ("created_at", "started_at", "finished_at"):
        assert run.as_dict()[key].endswith("+00:00")
    assert run.duration_seconds >= 0


# -- artifact folders -------------------------------------------------------------------------
def test_each_database_has_its_own_artifact_folder(tmp_path):
    main, second = Store(str(tmp_path / "main.db")), Store(str(tmp_path / "second.db"))
    assert new_run(main) == new_run(second) == 1
    folders = {main.artifacts_dir(1), second.artifacts_dir(1)}
    assert len(folders) == 2 and all(f.parent.parent == tmp_path / "artifacts" for f in folders)
    main.engine.dispose()
    shutil.copy(tmp_path / "main.db", tmp_path / "copy.db")
    copy = Store(str(tmp_path / "copy.db"))
    assert copy.database_id == main.database_id  # the id travels with the file
    assert copy.artifacts_dir(1) not in folders
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(tmp_path / "main.db", elsewhere / "main.db")
    assert Store(str(elsewhere / "main.db")).artifacts_dir(1).parent.parent == (
        elsewhere / "artifacts"
    )


# -- every backend stores and returns the same values ---------------------------------


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def test_migrated_schema_matches_the_table_definitions(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from headscope.storage.schema import Base

    store = Store(db_url)
    with store.engine.connect() as connection:
        # SQLite keeps 0001's declared types, which it never enforced (see 0002)
        options = {"compare_type": is_postgres(db_url)}
        context = MigrationContext.configure(connection, opts=options)
        assert compare_metadata(context, Base.metadata) == []


def test_migrations_go_down_and_up_and_keep_rows_written_before_an_upgrade(db_url):
    from alembic import command

    from headscope.storage.db import _alembic_config

    store = Store(db_url)
    url = store.engine.url.render_as_string(hide_password=False)
    with store.engine.begin() as connection:
        command.downgrade(_alembic_config(url, connection), "base")
    assert inspect(store.engine).get_table_names() == ["alembic_version"]
    with store.engine.begin() as connection:
        command.upgrade(_alembic_config(url, connection), "0001")
        connection.exec_driver_sql(  # a run written by the first schema
            "INSERT INTO runs (analysis, analysis_version, params, model_name, packages, seed,"
            " status, created_at, cancel_requested) VALUES ('a', '1', '{\"x\": 1}', 'm', '{}',"
            " 3, 'queued', '2024-05-01 10:00:00', false)"
        )
    assert upgrade(store.engine) == ("0001", head_revision())
    (kept,) = [run.id for run in store.list_runs()]
    assert store.get_run(kept).params == {"x": 1}
    assert new_run(store) == kept + 1


def test_long_names_and_large_numbers_are_stored_as_given(db_url):
    store = Store(db_url)
    long_name = "/models/" + "very-deep-folder/" * 20 + "model.gguf"
    model_id = store.ensure_model(
        {"name": long_name, "revision": "r" * 300, "parameters": 7 * 10**9}
    )
    assert store.models()[0]["parameters"] == 7 * 10**9
    run_id = store.create_run("a" * 300, "1", long_name, {}, seed=2**40, plugin="p" * 300)
    store.mark_running(run_id, model_id, "r" * 300)
    metric = "m" * 300
    artifact = {"name": "n" * 300, "media_type": "t" * 300, "path": "p", "size": 5 * 2**30}
    store.finish_run(run_id, [(0, 0, metric, 1.0)], {metric: 2.0}, [artifact])
    run = store.get_run(run_id)
    assert (run.model, run.model_revision, run.seed) == (long_name, "r" * 300, 2**40)
    assert store.top_heads(metric)[0]["model"] == long_name
    assert store.metrics(run_id) == {metric: 2.0}
    assert store.artifacts(run_id)[0]["size"] == 5 * 2**30


def test_times_read_back_in_utc_on_every_database(db_url):
    store = Store(db_url)
    before = datetime.now(UTC)
    run_id = new_run(store)
    store.mark_running(run_id, None, None)
    store.finish_run(run_id, [], {})
    after = datetime.now(UTC)
    run = store.get_run(run_id)
    assert before <= run.created_at <= run.started_at <= run.finished_at <= after
    assert run.finished_at.utcoffset().total_seconds() == 0
    assert 0 <= run.duration_seconds <= (after - before).total_seconds()
    assert run.as_dict()["created_at"] == run.created_at.isoformat()
    assert run.as_dict()["created_at"].endswith("+00:00")


def test_names_come_back_in_code_point_order(db_url):
    store = Store(db_url)
    run_id = new_run(store)
    names = ["b", "B", "a", "Z", "a_b", "ab", "é"]
    store.finish_run(run_id, [(0, 0, n, 1.0) for n in names], {n: 1.0 for n in names})
    assert list(store.metrics(run_id)) == sorted(names) == ["B", "Z", "a", "a_b", "ab", "b", "é"]
    assert [r["metric"] for r in store.head_scores(run_id)] == sorted(names)
    assert store.head_metrics(run_id) == sorted(names)


def test_a_nan_finding_is_refused_and_nothing_is_written(db_url):
    store = Store(db_url)
    run_id = new_run(store)
    with pytest.raises(ValueError, match="NaN.*'layer': 1, 'head': 2, 'metric': 's'"):
        store.finish_run(run_id, [(0, 0, "s", 1.0), (1, 2, "s", float("nan"))], {})
    with pytest.raises(ValueError, match="NaN.*'name': 'acc'"):
        store.finish_run(run_id, [(0, 0, "s", 1.0)], {"acc": float("nan")})
    assert store.head_scores(run_id) == [] and store.metrics(run_id) == {}
    assert store.get_run(run_id).status == "queued"


def test_infinite_scores_are_kept_and_ranked_as_numbers(db_url):
    store = Store(db_url)
    run_id = new_run(store)
    scores = [(0, 0, "s", float("-inf")), (0, 1, "s", 0.5), (0, 2, "s", float("inf"))]
    store.finish_run(run_id, scores, {"m": float("inf")})
    assert [r["value"] for r in store.top_heads("s")] == [float("inf"), 0.5, float("-inf")]
    assert store.metrics(run_id) == {"m": float("inf")}


def test_nan_inside_params_and_summary_does_not_stop_a_run(db_url):
    store = Store(db_url)
    run_id = new_run(store, params={"threshold": float("nan"), "xs": [1.0, float("inf")]})
    store.finish_run(run_id, [], {}, summary={"mean": float("nan"), "n": 0})
    run = store.get_run(run_id)
    if is_postgres(db_url):  # PostgreSQL's json has no NaN or infinity: they become null
        assert run.params == {"threshold": None, "xs": [1.0, None]}
        assert run.summary == {"mean": None, "n": 0}
    else:
        assert math.isnan(run.params["threshold"]) and run.params["xs"] == [1.0, float("inf")]
        assert math.isnan(run.summary["mean"]) and run.summary["n"] == 0


# -- queries ---------------------------------------------------------------------------


def test_findings_queries_filter_and_rank_across_runs(db_url):
    store = Store(db_url)
    first = new_run(store, analysis="x", model="m1")
    store.finish_run(first, [(0, 0, "s", 0.9), (0, 1, "s", 0.1)], {})
    second = new_run(store, analysis="y", model="m2")
    store.finish_run(second, [(1, 0, "s", 0.5), (1, 1, "s", 0.9)], {})
    unfinished = new_run(store, analysis="x", model="m1")
    assert [(r["run_id"], r["layer"], r["head"]) for r in store.top_heads("s")] == [
        (first, 0, 0),
        (second, 1, 1),
        (second, 1, 0),
        (first, 0, 1),
    ]
    assert [r["value"] for r in store.top_heads("s", model="m2")] == [0.9, 0.5]
    assert [r["value"] for r in store.top_heads("s", analysis="x", descending=False)] == [0.1, 0.9]
    assert [r["value"] for r in store.top_heads("s", min_value=0.5, limit=2, offset=1)] == [
        0.9,
        0.5,
    ]
    assert store.top_heads("other") == []
    assert [r.id for r in store.list_runs(analysis="x")] == [unfinished, first]
    assert [r.id for r in store.list_runs(limit=1, offset=1)] == [second]
    assert store.count_runs(model="m1", status="succeeded") == 1
    assert store.count_runs() == 3


def test_deleting_a_run_deletes_its_findings(db_url):
    store = Store(db_url)
    run_id = new_run(store)
    artifact = {"name": "plot", "media_type": "image/png", "path": "p.png", "size": 1}
    store.finish_run(run_id, [(0, 0, "s", 1.0)], {"m": 1.0}, [artifact])
    store.delete_runs([run_id])
    with store.engine.connect() as connection:
        for table in ("head_scores", "run_metrics", "artifacts"):
            assert connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar() == 0


def test_only_runs_of_dead_owners_are_interrupted_unless_all_are_asked_for(db_url):
    store = Store(db_url)
    alive = new_run(store)  # owned by this process
    assert store.mark_interrupted() == []
    assert store.mark_interrupted(only_dead_owners=False) == [alive]
    assert store.get_run(alive).status == "interrupted"
    assert store.get_run(alive).finished_at is not None


# -- several writers -------------------------------------------------------------------


def test_stores_opened_at_once_on_a_new_database_migrate_it_once(db_url):
    opened = []
    start = threading.Barrier(4)

    def open_store():
        start.wait()
        opened.append(Store(db_url))

    # daemons, so that a deadlock between the migrations fails the test, not the run
    threads = [threading.Thread(target=open_store, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(timeout=max(0, deadline - time.monotonic()))
    assert len(opened) == 4
    assert current_revision(opened[0].engine) == head_revision()


def test_two_processes_write_runs_into_one_store_at_once(db_url):
    from helpers.store_writer import MODEL, expected_scores, write_runs

    runs = 15
    other = subprocess.Popen(
        [sys.executable, "-m", "helpers.store_writer", db_url, "1", str(runs)],
        cwd=Path(__file__).parents[1],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = Store(db_url)
    assert other.stdout.readline() == "ready\n", other.communicate()[1]
    other.stdin.write("go\n")
    other.stdin.flush()
    write_runs(store, 0, runs)  # while the other process writes its own
    out, err = other.communicate(timeout=120)
    assert (other.returncode, out) == (0, "done\n"), err

    stored = store.list_runs(limit=1000)
    assert sorted((r.params["writer"], r.params["n"]) for r in stored) == [
        (w, n) for w in range(2) for n in range(runs)
    ]
    assert {r.status for r in stored} == {"succeeded"}
    for run in stored:
        writer, n = run.params["writer"], run.params["n"]
        assert store.head_scores(run.id) == [
            {"layer": layer, "head": head, "metric": m, "value": v}
            for layer, head, m, v in expected_scores(writer, n)
        ]
        assert store.metrics(run.id) == {"writer": float(writer)}
    assert [(m["name"], m["revision"]) for m in store.models()] == [
        (MODEL["name"], MODEL["revision"])
    ]


def test_a_model_another_writer_adds_meanwhile_is_reused(db_url):
    store, other = Store(db_url), Store(db_url)
    info = {"name": "m", "revision": "r"}

    def other_writer_first(connection, cursor, statement, *args):
        if statement.startswith("INSERT INTO models") and not other.models():
            other.ensure_model(info)

    event.listen(store.engine, "before_cursor_execute", other_writer_first)
    model_id = store.ensure_model(info)
    assert [m["id"] for m in store.models()] == [model_id]


# -- PostgreSQL connections ------------------------------------------------------------


def test_a_refused_connection_is_a_clear_error_without_the_password(postgres_cluster):
    url = postgres_cluster.url("postgres").replace(postgres_cluster.password, "not-the-password")
    with pytest.raises(HeadscopeError, match="cannot open database") as refused:
        Store(url)
    assert "password authentication failed" in str(refused.value)
    assert "not-the-password" not in str(refused.value) and "***" in str(refused.value)


def test_upgrading_an_older_database_gives_it_an_id_and_keeps_its_artifacts(tmp_path):
    from alembic import command

    from headscope.storage.db import _alembic_config

    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        command.upgrade(_alembic_config(url, connection), "0001")
        connection.exec_driver_sql(
            "INSERT INTO runs (analysis, analysis_version, params, model_name, packages, seed,"
            " status, created_at, cancel_requested) VALUES ('a', '1', '{}', 'm', '{}', 0,"
            " 'succeeded', '2024-05-01 10:00:00.000000', 0)"
        )
        connection.exec_driver_sql(
            "INSERT INTO artifacts (run_id, name, media_type, path, size, created_at) VALUES"
            f" (1, 'p.png', 'image/png', '{tmp_path}/artifacts/run-1/p.png', 3,"
            " '2024-05-01 10:00:00.000000')"
        )
    engine.dispose()
    store = Store(str(path))
    assert current_revision(store.engine) == head_revision()
    assert len(store.database_id) == 32
    assert store.artifacts(1)[0]["path"] == f"{tmp_path}/artifacts/run-1/p.png"
    assert store.get_run(1).as_dict()["created_at"] == "2024-05-01T10:00:00+00:00"
    assert new_run(store) == 2
    assert store.artifacts_dir(2) != tmp_path / "artifacts" / "run-2"


# -- removing runs ----------------------------------------------------------------------------
def finished_run(store, analysis="a", status="succeeded"):
    run_id = new_run(store, analysis=analysis)
    folder = store.artifacts_dir(run_id)
    (folder / "plot.png").write_bytes(b"png")
    (folder / "scratch.txt").write_bytes(b"left by the analysis")
    artifact = {"name": "plot.png", "media_type": "image/png", "size": 3}
    store.finish_run(
        run_id,
        [(0, 0, "s", 1.0)],
        {"m": 1.0},
        [{**artifact, "path": str(folder / "plot.png")}],
    )
    if status != "succeeded":
        with store.session() as session, session.begin():
            session.get(Run, run_id).status = status
    return run_id


def row_counts(store, run_id):
    with store.engine.connect() as connection:
        return [
            connection.exec_driver_sql(
                f"SELECT count(*) FROM {table} WHERE {key} = ?", (run_id,)
            ).scalar_one()
            for table, key in (
                ("runs", "id"),
                ("head_scores", "run_id"),
                ("run_metrics", "run_id"),
                ("artifacts", "run_id"),
            )
        ]


def test_deleting_runs_removes_their_rows_and_files_only(tmp_path):
    store = Store(str(tmp_path / "f.db"))
    other = Store(str(tmp_path / "other.db"))
    gone, kept = finished_run(store), finished_run(store)
    neighbour = finished_run(other)
    folder = store.artifacts_dir(gone)
    removals = store.delete_runs([gone])
    assert [r.run.id for r in removals] == [gone]
    assert sorted(removals[0].files) == [str(folder / "plot.png"), str(folder / "scratch.txt")]
    assert removals[0].kept == []
    assert row_counts(store, gone) == [0, 0, 0, 0]
    assert not folder.exists()
    assert row_counts(store, kept) == [1, 1, 1, 1]
    assert Path(store.artifacts(kept)[0]["path"]).read_bytes() == b"png"
    assert Path(other.artifacts(neighbour)[0]["path"]).read_bytes() == b"png"
    with pytest.raises(RunNotFoundError):
        store.get_run(gone)


def test_deleting_is_all_or_nothing_and_a_dry_run_removes_nothing(tmp_path):
    store = Store(str(tmp_path / "f.db"))
    done, active = finished_run(store), new_run(store)
    with pytest.raises(RunNotFoundError, match="no run with id 99"):
        store.delete_runs([done, 99])
    with pytest.raises(HeadscopeError, match=f"run {active} is queued"):
        store.delete_runs([done, active])
    store.mark_running(active, None, None)
    with pytest.raises(HeadscopeError, match=f"run {active} is running"):
        store.delete_runs([active])
    assert row_counts(store, done) == [1, 1, 1, 1] and row_counts(store, active)[0] == 1
    planned = store.delete_runs([done, active], force=True, dry_run=True)
    assert [r.run.id for r in planned] == [done, active] and len(planned[0].files) == 2
    assert row_counts(store, done) == [1, 1, 1, 1]
    assert all(Path(p).exists() for p in planned[0].files)
    assert [r.run.id for r in store.delete_runs([done, active], force=True)] == [done, active]
    assert store.count_runs() == 0


def test_files_outside_the_database_folder_are_left_in_place(tmp_path):
    store = Store(str(tmp_path / "main.db"))
    run_id = finished_run(store)
    store.engine.dispose()
    shutil.copy(tmp_path / "main.db", tmp_path / "copy.db")
    copy = Store(str(tmp_path / "copy.db"))
    original = store.artifacts(run_id)[0]["path"]
    removal = copy.delete_runs([run_id])[0]
    assert removal.files == [] and removal.kept == [original]
    assert Path(original).read_bytes() == b"png"
    assert store.get_run(run_id).status == "succeeded"


def test_run_ids_select_what_to_prune(tmp_path):
    store = Store(str(tmp_path / "f.db"))
    failed = finished_run(store, status="failed")
    old = finished_run(store, analysis="b")
    with store.session() as session, session.begin():
        session.get(Run, old).created_at = datetime.now(UTC) - timedelta(days=40)
    recent = finished_run(store)
    assert store.run_ids(statuses=["failed"]) == [failed]
    assert store.run_ids(statuses=["failed", "succeeded"]) == [failed, old, recent]
    cutoff = datetime.now(UTC) - timedelta(days=30)
    assert store.run_ids(created_before=cutoff) == [old]
    assert store.run_ids(analysis="a") == [failed, recent]
    assert store.run_ids(analysis="a", statuses=["succeeded"]) == [recent]


def test_a_removed_run_s_id_is_never_given_again(tmp_path):
    store = Store(str(tmp_path / "f.db"))
    first, last = new_run(store), new_run(store)
    store.delete_runs([last], force=True)
    assert new_run(store) == last + 1
    store.delete_runs([first, last + 1], force=True)
    assert new_run(store) == last + 2


def test_numbers_beyond_sql_integers_name_nothing(tmp_path):
    store = Store(str(tmp_path / "f.db"))
    run_id = new_run(store)
    store.finish_run(run_id, [(0, 1, "s", 0.5)], {"m": 1.0})
    huge = 2**63
    for call in (store.get_run, store.request_cancel):
        with pytest.raises(RunNotFoundError, match=f"no run with id {huge}"):
            call(huge)
    assert store.head_scores(huge) == [] and store.metrics(huge) == {}
    assert store.head_metrics(-huge - 1) == []
    assert store.list_runs(offset=huge) == [] and len(store.list_runs(limit=huge)) == 1
    assert store.top_heads("s", offset=huge) == [] and store.top_heads("s", run_id=huge) == []
    assert len(store.top_heads("s", limit=huge)) == 1
    assert store.head_across_runs(huge, 1) == [] and len(store.head_across_runs(0, 1)) == 1


def test_head_rank_places_a_head_among_the_runs_heads(db_url):
    store = Store(db_url)
    run_id = new_run(store)
    scores = [(0, 0, "s", 0.5), (0, 1, "s", 0.9), (1, 0, "s", 0.5), (1, 1, "s", 0.1)]
    store.finish_run(run_id, [*scores, (1, 1, "t", 7.0)], {})
    assert store.head_rank(run_id, "s", 0, 1) == (1, 4)
    assert store.head_rank(run_id, "s", 0, 0) == (2, 4) == store.head_rank(run_id, "s", 1, 0)
    assert store.head_rank(run_id, "s", 1, 1) == (4, 4)
    assert store.head_rank(run_id, "t", 1, 1) == (1, 1)
    assert store.head_rank(run_id, "t", 0, 0) is None  # no score for that metric
    assert store.head_rank(run_id, "nope", 0, 0) is None
    assert (
        store.head_rank(2**63, "s", 0, 0) is None and store.head_rank(run_id, "s", 2**63, 0) is None
    )
