"""A front end that loads no model (`serve --no-workers`) on PostgreSQL, a worker
process behind it, and named tokens: scopes enforced with their documented code,
the submitting token recorded, progress of a remote run visible."""

from __future__ import annotations

import time

import httpx
import pytest

from headscope.core.rpc.errors import FORBIDDEN

from helpers.cli import run_cli
from helpers.queue import Workers
from helpers.rpc import RpcError, Server

pytestmark = pytest.mark.slow


def make_token(capsys, url: str, name: str, *scopes: str) -> str:
    options = [part for scope in scopes for part in ("--scope", scope)]
    result = run_cli(capsys, "tokens", "create", name, *options, "-f", "json", "--db", url)
    assert result.code == 0, result.err
    return result.json()["token"]


def test_front_end_with_a_worker_and_scoped_tokens(capsys, postgres_url, queue_env, tmp_path):
    reader = make_token(capsys, postgres_url, "reader", "read")
    submitter = make_token(capsys, postgres_url, "lab-bot", "submit")
    admin = make_token(capsys, postgres_url, "admin", "admin")
    front = Server(postgres_url, "--no-workers", env=queue_env, logs=tmp_path)
    workers = Workers(postgres_url, queue_env)
    try:
        assert front.listening["auth"] is True
        anonymous = httpx.post(front.url, json={"jsonrpc": "2.0", "method": "runs.list", "id": 1})
        assert anonymous.status_code == 401

        read = front.client(reader)
        assert read.call("runs.list")["total"] == 0
        submit = {"analysis": "example-wait", "model": "tiny-llama", "params": {"seconds": 3}}
        with pytest.raises(RpcError) as refused:
            read.call("runs.submit", **submit)
        assert refused.value.code == FORBIDDEN
        assert refused.value.data["required"] == "submit"
        assert read.call("runs.list")["total"] == 0  # nothing stored

        bot = front.client(submitter)
        run_id = bot.call("runs.submit", **submit)["run_id"]
        with pytest.raises(RpcError) as refused:
            bot.call("models.load", name="tiny-llama")
        assert refused.value.code == FORBIDDEN
        with pytest.raises(RpcError) as no_models:  # the front end holds none
            front.client(admin).call("models.load", name="tiny-llama")
        assert "loads no models" in no_models.value.message

        workers.start()
        seen_progress = False
        deadline = time.time() + 120
        while (run := read.call("runs.get", run_id=run_id)["run"])["status"] in (
            "queued",
            "running",
        ):
            seen_progress |= run["status"] == "running" and (run["progress_done"] or 0) > 0
            assert time.time() < deadline
            time.sleep(0.1)
        assert run["status"] == "succeeded"
        assert seen_progress, "the worker's progress never showed on the front end"
        assert run["submitted_by"] == "lab-bot"

        assert run_cli(capsys, "tokens", "revoke", "reader", "--db", postgres_url).code == 0
        assert (
            httpx.post(
                front.url,
                json={"jsonrpc": "2.0", "method": "runs.list", "id": 1},
                headers={"Authorization": f"Bearer {reader}"},
            ).status_code
            == 401
        )
        listed = run_cli(capsys, "tokens", "list", "-f", "json", "--db", postgres_url).json()
        assert [(t["name"], t["revoked_at"] is not None) for t in listed] == [
            ("reader", True),
            ("lab-bot", False),
            ("admin", False),
        ]
    finally:
        workers.stop()
        front.stop()


def test_serve_on_postgresql_runs_queued_runs_itself(postgres_url, queue_env, tmp_path):
    server = Server(postgres_url, env=queue_env, logs=tmp_path)
    try:
        client = server.client()
        run_id = client.call(
            "runs.submit", analysis="example-wait", model="tiny-llama", params={"seconds": 0.2}
        )["run_id"]
        finished = client.wait_for(run_id, ("succeeded", "failed"))
        assert finished["run"]["status"] == "succeeded"
    finally:
        server.stop()


@pytest.mark.parametrize("command", [["worker"], ["serve", "--no-workers"]])
def test_the_queue_commands_need_postgresql(capsys, tmp_path, command):
    result = run_cli(capsys, *command, "--db", str(tmp_path / "findings.db"))
    assert result.code == 1
    assert "PostgreSQL" in result.err
