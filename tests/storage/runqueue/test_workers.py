"""Worker processes draining the queue in a real PostgreSQL database: no run taken
twice, a worker killed mid-run retried on another with one stored result, cancels
reaching a remote worker, and runs given up after their last attempt."""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import create_engine, text

from headscope.storage.store import Store

from helpers.cli import run_cli

pytestmark = pytest.mark.slow


def submit(capsys, monkeypatch, url: str, seconds: float) -> int:
    result = run_cli(
        capsys, "runs", "submit", "example-wait", "-m", "tiny-llama",
        "-p", f"seconds={seconds}", "-f", "json", "--db", url,
    )  # fmt: skip
    assert result.code == 0, result.err
    return result.json()["run_id"]


def wait_for(store: Store, run_ids: list[int], timeout: float = 120) -> dict[int, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        statuses = {run_id: store.get_run(run_id).status for run_id in run_ids}
        if all(status not in ("queued", "running") for status in statuses.values()):
            return statuses
        time.sleep(0.2)
    raise AssertionError(f"runs still unfinished: {statuses}")


def starts_per_job(url: str) -> dict[int, int]:
    """How many times each job was taken by a worker (procrastinate's own events)."""
    with create_engine(url).connect() as connection:
        rows = connection.execute(
            text(
                "SELECT job_id, count(*) FROM headscope_queue.procrastinate_events "
                "WHERE type = 'started' GROUP BY job_id"
            )
        )
        return dict(rows.all())


def metric_rows(url: str, run_id: int) -> int:
    with create_engine(url).connect() as connection:
        query = text("SELECT count(*) FROM run_metrics WHERE run_id = :run")
        return connection.execute(query, {"run": run_id}).scalar()


def test_two_workers_drain_the_queue_and_no_run_is_taken_twice(
    capsys, monkeypatch, postgres_url, workers
):
    run_ids = [submit(capsys, monkeypatch, postgres_url, 0.3) for _ in range(8)]
    workers.start()
    workers.start()
    store = Store(postgres_url)
    assert set(wait_for(store, run_ids).values()) == {"succeeded"}
    assert sorted(starts_per_job(postgres_url).values()) == [1] * len(run_ids)
    assert all(metric_rows(postgres_url, run_id) == 1 for run_id in run_ids)


def test_a_worker_killed_mid_run_is_retried_on_another_with_one_result(
    capsys, monkeypatch, postgres_url, workers
):
    run_id = submit(capsys, monkeypatch, postgres_url, 6)
    first = workers.start()
    store = Store(postgres_url)
    deadline = time.time() + 120
    while (store.get_run(run_id).progress_done or 0) <= 0:
        assert time.time() < deadline, "the run never started"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    # a command on the same machine must not mark the queue's run interrupted
    listed = run_cli(capsys, "runs", "list", "-f", "json", "--db", postgres_url).json()
    assert {r["id"]: r["status"] for r in listed["runs"]}[run_id] == "running"
    workers.start()
    assert wait_for(store, [run_id], timeout=180) == {run_id: "succeeded"}
    assert starts_per_job(postgres_url) == {store.queue_job(run_id): 2}
    assert metric_rows(postgres_url, run_id) == 1


def test_a_run_whose_workers_keep_dying_fails_with_the_reason(
    capsys, monkeypatch, postgres_url, workers
):
    run_id = submit(capsys, monkeypatch, postgres_url, 60)
    store = Store(postgres_url)
    for _attempt in range(2):
        worker = workers.start("--max-attempts", "2")
        deadline = time.time() + 120
        while store.get_run(run_id).status != "running" or not store.get_run(run_id).progress_done:
            assert time.time() < deadline, "the run never started"
            time.sleep(0.1)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        with create_engine(postgres_url).connect() as connection:  # progress starts anew
            connection.execute(text("UPDATE runs SET progress_done = NULL"))
            connection.commit()
    workers.start("--max-attempts", "2")  # the survivor finds the stalled job and gives up
    assert wait_for(store, [run_id], timeout=60) == {run_id: "failed"}
    assert "given up after 2 attempts" in store.get_run(run_id).error
    assert metric_rows(postgres_url, run_id) == 0


def test_cancel_reaches_a_run_on_a_worker(capsys, monkeypatch, postgres_url, workers):
    run_id = submit(capsys, monkeypatch, postgres_url, 60)
    workers.start()
    store = Store(postgres_url)
    deadline = time.time() + 120
    while (store.get_run(run_id).progress_done or 0) <= 0:
        assert time.time() < deadline, "the run never started"
        time.sleep(0.1)
    assert run_cli(capsys, "runs", "cancel", str(run_id), "--db", postgres_url).code == 0
    assert wait_for(store, [run_id], timeout=30) == {run_id: "cancelled"}


def test_submit_needs_postgresql(capsys, tmp_path):
    result = run_cli(capsys, "runs", "submit", "head-detector", "--db", str(tmp_path / "x.db"))
    assert result.code == 1
    assert "PostgreSQL" in result.err


def test_a_database_restart_mid_run_is_waited_out(
    capsys, monkeypatch, postgres_cluster, postgres_url, workers
):
    run_id = submit(capsys, monkeypatch, postgres_url, 5)
    workers.start()
    store = Store(postgres_url)
    deadline = time.time() + 120
    while (store.get_run(run_id).progress_done or 0) <= 0:
        assert time.time() < deadline, "the run never started"
        time.sleep(0.1)
    postgres_cluster.restart()
    store.engine.dispose()
    assert wait_for(store, [run_id], timeout=180) == {run_id: "succeeded"}
    assert metric_rows(postgres_url, run_id) == 1
