"""The findings store: migrations, the run lifecycle, queries and exports."""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy.exc
from sqlalchemy import inspect

from headscope.core.errors import HeadscopeError, RunNotFoundError
from headscope.core.runs import run_document
from headscope.storage.db import current_revision, head_revision, upgrade
from headscope.storage.export import head_scores_csv
from headscope.storage.store import Store


def new_run(store, analysis="a", model="m", params=None):
    return store.create_run(analysis, "1", model, params or {"x": 1}, seed=3, plugin="p")


def test_schema_is_created_by_migrations_and_upgrade_is_idempotent(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
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
    mode = sqlite3.connect(tmp_path / "f.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_bare_path_and_env_var_select_the_database(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_DB", str(tmp_path / "env.db"))
    assert Store().path == tmp_path / "env.db"
    assert Store(str(tmp_path / "explicit.db")).path == tmp_path / "explicit.db"


def test_run_lifecycle_writes_findings_in_one_go(tmp_path):
    store = Store(str(tmp_path / "f.db"))
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


def test_a_failed_finalisation_leaves_nothing_half_written(tmp_path):
    store = Store(str(tmp_path / "f.db"))
    good = new_run(store)
    store.finish_run(good, [(0, 0, "s", 1.0)], {"m": 1.0})
    bad = new_run(store)
    duplicate = [(0, 0, "s", 1.0), (0, 0, "s", 2.0)]  # violates the primary key
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        store.finish_run(bad, duplicate, {"m": 2.0})
    assert store.head_scores(bad) == [] and store.metrics(bad) == {}
    assert store.get_run(bad).status == "queued"
    assert store.head_scores(good) == [{"layer": 0, "head": 0, "metric": "s", "value": 1.0}]


def test_failure_records_the_error_and_keeps_other_runs(tmp_path):
    store = Store(str(tmp_path / "f.db"))
    first = new_run(store)
    store.finish_run(first, [(0, 0, "s", 1.0)], {})
    second = new_run(store)
    store.fail_run(second, "it broke")
    assert store.get_run(second).status == "failed"
    assert store.get_run(second).error == "it broke"
    assert store.get_run(first).status == "succeeded"


def test_cancel_and_missing_runs(tmp_path):
    store = Store(str(tmp_path / "f.db"))
    queued = new_run(store)
    assert store.request_cancel(queued) == "cancelled"
    running = new_run(store)
    store.mark_running(running, None, None)
    assert store.request_cancel(running) == "running"
    assert store.update_progress(running, 1, 2, "x") is True
    with pytest.raises(RunNotFoundError):
        store.get_run(999)


def test_runs_of_dead_processes_are_marked_interrupted(tmp_path):
    store = Store(str(tmp_path / "f.db"))
    run_id = new_run(store)
    store.mark_running(run_id, None, None)
    with store.session() as session, session.begin():
        from headscope.storage.schema import Run

        session.get(Run, run_id).owner_pid = 2**22 + 12345  # no such process
    assert store.mark_interrupted() == [run_id]
    assert store.get_run(run_id).status == "interrupted"


def test_export_csv_and_json_carry_the_same_numbers(tmp_path):
    store = Store(str(tmp_path / "f.db"))
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


def test_unversioned_tables_are_not_touched(tmp_path):
    path = tmp_path / "foreign.db"
    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY)")
    connection.commit()
    connection.close()
    with pytest.raises(HeadscopeError, match="no migration record"):
        Store(str(path))


def test_a_corrupt_database_file_is_a_clear_error(tmp_path):
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(HeadscopeError, match="cannot open database"):
        Store(str(path))
    assert path.read_bytes().startswith(b"this is not a database")


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
