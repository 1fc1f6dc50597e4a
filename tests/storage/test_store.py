"""The findings store: migrations, the run lifecycle, queries and exports.

Tests taking `db_url` run once on SQLite and once on a real PostgreSQL server.
"""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy.exc
from sqlalchemy import create_engine, event, inspect

from headscope.core.errors import HeadscopeError, RunNotFoundError
from headscope.core.runs import run_document
from headscope.storage.db import current_revision, head_revision, upgrade
from headscope.storage.export import head_scores_csv
from headscope.storage.store import Store


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
    with store.engine.begin() as connection:
        command.downgrade(_alembic_config(store.engine, connection), "base")
    assert inspect(store.engine).get_table_names() == ["alembic_version"]
    with store.engine.begin() as connection:
        command.upgrade(_alembic_config(store.engine, connection), "0001")
    kept = new_run(store)
    assert upgrade(store.engine) == ("0001", head_revision())
    assert store.get_run(kept).params == {"x": 1}


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


def test_times_read_back_as_naive_utc(db_url):
    store = Store(db_url)
    before = datetime.now(UTC).replace(tzinfo=None)
    run_id = new_run(store)
    store.mark_running(run_id, None, None)
    store.finish_run(run_id, [], {})
    after = datetime.now(UTC).replace(tzinfo=None)
    run = store.get_run(run_id)
    assert before <= run.created_at <= run.started_at <= run.finished_at <= after
    assert run.finished_at.tzinfo is None
    assert 0 <= run.duration_seconds <= (after - before).total_seconds()
    assert run.as_dict()["created_at"] == run.created_at.isoformat()


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
    store.delete_run(run_id)
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
