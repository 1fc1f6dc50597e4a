"""Killing a run mid-way leaves the database readable and earlier runs intact."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

from headscope.storage.store import Store

from helpers.cli import run_cli


def test_kill_during_a_run_keeps_the_database_and_earlier_runs(plugin_path, tmp_path, capsys):
    db = tmp_path / "kill.db"
    first = run_cli(
        capsys,
        "run",
        "head-detector",
        "-m",
        "tiny-llama",
        "-p",
        "n_random=1",
        "-p",
        "random_length=4",
        "-f",
        "json",
        "--db",
        str(db),
    )
    assert first.code == 0, first.err
    before = first.json()

    env = {**os.environ, "PYTHONPATH": str(plugin_path), "HEADSCOPE_LOAD_PLUGINS": "example"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "headscope.cli",
            "run",
            "example-wait",
            "-m",
            "tiny-llama",
            "-p",
            "seconds=120",
            "-f",
            "json",
            "--db",
            str(db),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    store = Store(str(db))
    deadline = time.time() + 120
    killed_id = None
    while time.time() < deadline:
        running = [r for r in store.list_runs(status="running") if r.analysis == "example-wait"]
        if running and (running[0].progress_done or 0) > 0:
            killed_id = running[0].id
            break
        time.sleep(0.2)
    assert killed_id is not None, "the run never reported progress"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    connection = sqlite3.connect(db)
    assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    connection.close()
    listed = run_cli(capsys, "runs", "list", "-f", "json", "--db", str(db)).json()
    statuses = {r["id"]: r["status"] for r in listed["runs"]}
    assert statuses[killed_id] == "interrupted"
    assert statuses[before["run"]["id"]] == "succeeded"
    after = run_cli(
        capsys, "runs", "show", str(before["run"]["id"]), "-f", "json", "--db", str(db)
    ).json()
    assert after["head_scores"] == before["head_scores"]
    assert after["metrics"] == before["metrics"]


def test_ctrl_c_marks_the_run_interrupted_at_once(plugin_path, tmp_path):
    db = tmp_path / "sigint.db"
    env = {**os.environ, "PYTHONPATH": str(plugin_path), "HEADSCOPE_LOAD_PLUGINS": "example"}
    command = [sys.executable, "-m", "headscope.cli", "run", "example-wait", "-m", "tiny-llama"]
    command += ["-p", "seconds=120", "-f", "json", "--db", str(db)]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job ignores SIGINT, and a child would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    store = Store(str(db))
    deadline = time.time() + 120
    while time.time() < deadline:
        running = [r for r in store.list_runs(status="running") if (r.progress_done or 0) > 0]
        if running:
            break
        time.sleep(0.2)
    assert running, "the run never reported progress"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert f"run {running[0].id} is stored as interrupted" in err and "Traceback" not in err
    run = store.get_run(running[0].id)
    assert run.status == "interrupted" and "Ctrl-C" in run.error
