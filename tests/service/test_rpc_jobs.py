"""Jobs through the service: cancel, recovery after a crash, graceful shutdown.

Uses the example plugin's slow `example-wait` analysis, which reports progress
every 50 ms, on a real server process.
"""

from __future__ import annotations

import signal
import time

import pytest

from headscope.storage.store import Store

from helpers.rpc import RpcError, Server


@pytest.fixture
def plugin_env(plugin_path):
    return {"PYTHONPATH": str(plugin_path), "HEADSCOPE_LOAD_PLUGINS": "example"}


def wait_until_running(client, run_id: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.call("runs.get", run_id=run_id)["run"]
        if run["status"] == "running" and (run["progress_done"] or 0) > 0:
            return run
        assert run["status"] in ("queued", "running"), run
        time.sleep(0.1)
    raise TimeoutError(f"run {run_id} never reported progress")


def submit_wait(client, seconds: float) -> int:
    return client.call(
        "runs.submit", analysis="example-wait", model="tiny-llama", params={"seconds": seconds}
    )["run_id"]


def test_cancel_queued_and_running_runs(tmp_path, plugin_env):
    server = Server(tmp_path / "cancel.db", env=plugin_env)
    client = server.client()
    try:
        running = submit_wait(client, 60)
        queued = submit_wait(client, 60)  # same model: waits for the first
        wait_until_running(client, running)
        assert client.call("runs.get", run_id=queued)["run"]["status"] == "queued"
        with pytest.raises(RpcError) as busy:
            client.call("models.unload", name="tiny-llama")
        assert busy.value.code == -32007
        with pytest.raises(RpcError) as not_finished:
            client.call("findings.query", run_id=running, metric="x")
        assert not_finished.value.code == -32005

        assert client.call("runs.cancel", run_id=queued) == {
            "run_id": queued,
            "status": "cancelled",
        }
        assert client.call("runs.cancel", run_id=running)["status"] == "running"
        started = time.monotonic()
        stopped = client.wait_for(running, ("cancelled", "succeeded", "failed"), timeout=30)
        assert stopped["run"]["status"] == "cancelled"
        assert time.monotonic() - started < 10  # at the next progress point, not after 60 s
        with pytest.raises(RpcError) as failed:
            client.call("runs.compare", run_a=running, run_b=queued)
        assert failed.value.code == -32004 and failed.value.data["status"] == "cancelled"

        finished = submit_wait(client, 0.2)  # the worker goes on with new runs
        assert client.wait_for(finished, ("succeeded", "failed"))["run"]["status"] == "succeeded"
        assert client.call("runs.cancel", run_id=finished)["status"] == "succeeded"
        assert client.call("models.unload", name="tiny-llama") == {
            "name": "tiny-llama",
            "unloaded": True,
        }
    finally:
        client.close()
        assert server.stop() == 0


def test_a_full_queue_refuses_runs_and_stores_nothing(tmp_path, plugin_env):
    server = Server(tmp_path / "queue.db", "--max-queued", "2", env=plugin_env)
    client = server.client()
    try:
        running = submit_wait(client, 60)
        wait_until_running(client, running)  # a running run does not count
        queued = [submit_wait(client, 60), submit_wait(client, 60)]
        total = client.call("runs.list")["total"]
        with pytest.raises(RpcError) as full:
            submit_wait(client, 60)
        assert full.value.code == -32009 and full.value.data == {"max_queued": 2}
        assert "queue is full" in full.value.message
        assert client.call("runs.list")["total"] == total == 3  # nothing stored
        with pytest.raises(RpcError) as invalid:  # bad input is still reported as such
            client.call("runs.submit", analysis="example-wait", params={"seconds": -1})
        assert invalid.value.code == -32602

        client.call("runs.cancel", run_id=queued[0])  # a cancelled run frees its place
        again = submit_wait(client, 0.1)
        assert client.call("runs.get", run_id=again)["run"]["status"] == "queued"
        for run_id in (running, queued[1], again):
            client.call("runs.cancel", run_id=run_id)
    finally:
        client.close()
        assert server.stop() == 0


def test_restart_marks_runs_of_a_dead_server_interrupted(tmp_path, plugin_env):
    db = tmp_path / "recover.db"
    first = Server(db, env=plugin_env)
    try:
        client = first.client()
        running = submit_wait(client, 120)
        queued = submit_wait(client, 120)
        wait_until_running(client, running)
        client.close()
    finally:
        first.stop(signal.SIGKILL)  # a crash: no chance to record anything

    second = Server(db, env=plugin_env)
    client = second.client()
    try:
        assert sorted(second.listening["interrupted_runs"]) == [running, queued]
        for run_id in (running, queued):
            assert client.call("runs.get", run_id=run_id)["run"]["status"] == "interrupted"

        # a graceful stop (SIGTERM) records its running and queued runs as interrupted
        running = submit_wait(client, 120)
        queued = submit_wait(client, 120)
        wait_until_running(client, running)
    finally:
        client.close()
        assert second.stop(signal.SIGTERM, timeout=60) == 0
    runs = {run.id: run for run in Store(str(db)).list_runs()}
    assert runs[running].status == "interrupted" and runs[queued].status == "interrupted"


def test_a_plugin_rpc_method_is_served_and_published(tmp_path, plugin_env):
    server = Server(tmp_path / "method.db", env=plugin_env)
    client = server.client()
    try:
        shape = client.call("example.heads", model="tiny-llama")
        assert shape == {"model": "tiny-llama", "layers": 3, "query_heads": 4, "kv_heads": 2}
        with pytest.raises(RpcError) as bad:
            client.call("example.heads", model=3)
        assert bad.value.code == -32602
        names = [m["name"] for m in client.call("rpc.discover")["methods"]]
        assert names.index("generate.steer") < names.index("example.heads")
        assert names[-1] == "rpc.discover"
        plugins = {p["name"]: p for p in client.call("plugins.list")}
        assert plugins["example"]["rpc_methods"] == ["example.heads"]
    finally:
        client.close()
        server.stop()
