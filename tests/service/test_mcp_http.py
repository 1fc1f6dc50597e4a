"""`headscope mcp --http` as an agent sees it: a real process, the mcp SDK's own
streamable-HTTP client, behind the same token rules as `headscope serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from mcp import MCPError

from helpers.mcp import mcp_http_session
from helpers.rpc import Server

TOKEN = "mcp-http-secret"
TINY_DETECTOR = {"model": "tiny-llama", "n_random": 1, "random_length": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    db = tmp_path_factory.mktemp("mcp-http") / "mcp.db"
    server = Server(db, env={"HEADSCOPE_TOKEN": TOKEN, "HEADSCOPE_LOAD_PLUGINS": ""},
                    command=("mcp", "--http"))  # fmt: skip
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]
    assert '"event": "stopped"' in server.events.read_text()


def test_tools_a_run_and_its_findings_over_http(server):
    assert server.url.endswith("/mcp") and server.listening["auth"] is True
    with mcp_http_session(server.url, TOKEN) as session:
        tools = session.tools()
        assert {"run_head_detector", "runs_get", "findings_query", "findings_head"} <= set(tools)
        submitted = session.call("run_head_detector", **TINY_DETECTOR)
        assert not submitted.is_error, submitted.content
        run_id = submitted.structured_content["run_id"]
        finished = session.wait_for(run_id)
        assert finished.structured_content["run"]["status"] == "succeeded"

        document = session.read_json(f"headscope://runs/{run_id}")
        assert document["run"]["id"] == run_id
        assert len(document["head_scores"]) == 3 * 4 * 4  # layers x heads x metrics
        media_type, png = session.read(f"headscope://runs/{run_id}/heatmaps/induction")
        assert media_type == "image/png" and png.startswith(b"\x89PNG")

        head = session.call("findings_head", layer=1, head=2, model="tiny-llama")
        (entry,) = head.structured_content["runs"]
        assert entry["run_id"] == run_id and set(entry["scores"]) >= {"induction"}

        bad = session.call("run_head_detector", model="tiny-llama", n_random=-1)
        assert bad.is_error and bad.structured_content["error"]["code"] == -32602


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer"])
def test_a_missing_or_wrong_token_is_refused(server, header):
    headers = {"Accept": "application/json, text/event-stream"}
    if header is not None:
        headers["Authorization"] = header
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    response = httpx.post(server.url, json=initialize, headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == -32010


def leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


def test_the_sdk_client_without_the_token_is_told_why(server):
    with pytest.raises(BaseExceptionGroup) as raised, mcp_http_session(server.url) as session:
        session.tools()
    (error,) = leaves(raised.value)
    assert isinstance(error, MCPError) and error.error.code == -32010
    assert "bearer token is required" in str(error)


def test_beyond_loopback_a_token_is_required(tmp_path):
    command = [sys.executable, "-m", "headscope.cli", "mcp", "--http", "--host", "0.0.0.0"]
    without_token = {k: v for k, v in os.environ.items() if k != "HEADSCOPE_TOKEN"}
    result = subprocess.run(
        [*command, "--db", str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**without_token, "HEADSCOPE_LOAD_PLUGINS": ""},
    )
    assert result.returncode == 1
    assert "reachable from other machines" in result.stderr and "--token" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_read_token_may_query_but_not_submit(tmp_path):
    db = tmp_path / "scoped.db"
    created = subprocess.run(
        [sys.executable, "-m", "headscope.cli", "tokens", "create", "reader"]
        + ["--scope", "read", "--format", "json", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    reader = json.loads(created.stdout)["token"]
    env = {"HEADSCOPE_TOKEN": "", "HEADSCOPE_LOAD_PLUGINS": ""}
    server = Server(db, env=env, command=("mcp", "--http"))
    try:
        assert server.listening["auth"] is True  # a stored token makes one required
        with mcp_http_session(server.url, reader) as session:
            listed = session.call("runs_list")
            assert not listed.is_error, listed.content
            refused = session.call("run_head_detector", **TINY_DETECTOR)
            assert refused.is_error
            assert refused.structured_content["error"]["code"] == -32012
            assert "'submit' scope" in refused.structured_content["error"]["message"]
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]
