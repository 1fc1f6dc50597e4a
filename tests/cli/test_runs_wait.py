"""`headscope runs wait`: blocks until a run has finished; the exit code says how."""

from __future__ import annotations

import threading
import time

from headscope.storage.schema import Run
from headscope.storage.store import Store

from helpers.cli import run_cli
from helpers.store import failed_run, finished_run


def test_wait_returns_at_once_for_finished_runs_with_their_outcome(capsys, tmp_path):
    db = str(tmp_path / "wait.db")
    store = Store(db)
    done = finished_run(store, "tiny-llama", [(0, 0, "induction", 0.5)])
    failed = failed_run(store, "tiny-llama", "out of memory")
    succeeded = run_cli(capsys, "runs", "wait", str(done), "--db", db)
    assert succeeded.code == 0 and f"run {done}: succeeded" in succeeded.out
    result = run_cli(capsys, "runs", "wait", str(failed), "--db", db)
    assert result.code == 1 and "failed (out of memory)" in result.out
    as_json = run_cli(capsys, "runs", "wait", str(failed), "-f", "json", "--db", db)
    assert as_json.code == 1 and as_json.json()["status"] == "failed"
    missing = run_cli(capsys, "runs", "wait", "99", "--db", db)
    assert missing.code == 1 and "no run with id 99" in missing.err


def test_wait_follows_progress_until_the_run_finishes(capsys, tmp_path, monkeypatch):
    db = str(tmp_path / "wait.db")
    store = Store(db)
    run_id = store.create_run("head-detector", "1", "tiny-llama", {}, seed=0)
    store.mark_running(run_id, None, None)
    store.update_progress(run_id, 1, 4, "step 1")
    polled = threading.Event()
    get_run = Store.get_run

    def watched(self, wanted):
        if self is not store:  # the command's own store: it is polling
            polled.set()
        return get_run(self, wanted)

    monkeypatch.setattr(Store, "get_run", watched)

    def work() -> None:  # what a worker does, from another thread
        polled.wait(60)
        for step in (2, 3, 4):
            store.update_progress(run_id, step, 4, f"step {step}")
            time.sleep(0.2)
        store.finish_run(run_id, [(0, 0, "induction", 0.5)], {})

    worker = threading.Thread(target=work)
    worker.start()
    result = run_cli(capsys, "runs", "wait", str(run_id), "--db", db)
    worker.join()
    assert result.code == 0, result.err
    assert f"run {run_id}: succeeded" in result.out
    assert f"run {run_id} (head-detector)" in result.err and "100%" in result.err


def test_wait_times_out_in_one_line_and_notices_a_dead_runner(capsys, tmp_path):
    db = str(tmp_path / "wait.db")
    store = Store(db)
    queued = store.create_run("head-detector", "1", "tiny-llama", {}, seed=0)  # this process
    result = run_cli(capsys, "runs", "wait", str(queued), "--timeout", "0.5", "--db", db)
    assert result.code == 1 and f"run {queued} is still queued after 0.5 s" in result.err
    assert "Traceback" not in result.err
    assert result.err.strip().splitlines()[-1].startswith(f"Error: run {queued} is still")
    assert store.get_run(queued).status == "queued"  # waiting changes nothing

    orphan = store.create_run("head-detector", "1", "tiny-llama", {}, seed=0)
    store.mark_running(orphan, None, None)
    with store.session() as session, session.begin():
        session.get(Run, orphan).owner_pid = 2**22 + 12345  # no such process
    stopped = run_cli(capsys, "runs", "wait", str(orphan), "--db", db)
    assert stopped.code == 1 and "interrupted" in stopped.out

    negative = run_cli(capsys, "runs", "wait", str(queued), "--timeout", "-1", "--db", db)
    assert negative.code == 1 and "--timeout cannot be negative" in negative.err
