"""Who may call: the one token check both HTTP transports make, and that each
transport asks the check it is given (so a token store can replace it)."""

from __future__ import annotations

import threading

import anyio
import httpx
import pytest
from pydantic import BaseModel

from headscope.core.mcp.http import RequireCaller
from headscope.core.rpc.auth import ANONYMOUS, SCOPES, Caller, bearer_token, static_token
from headscope.core.rpc.http import RpcHTTPServer
from headscope.core.rpc.protocol import Endpoint, RpcMethod


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer s3cret", "s3cret"),
        ("bearer s3cret", "s3cret"),
        ("Bearer   s3cret  ", "s3cret"),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Basic s3cret", None),
        ("s3cret", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token_reads_only_bearer_headers(header, token):
    assert bearer_token(header) == token


def test_a_static_token_allows_its_holder_everything_and_no_one_else():
    authorize = static_token("s3cret")
    caller = authorize("Bearer s3cret")
    assert caller is not None and caller.scopes == SCOPES
    for refused in (None, "", "Bearer wrong", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret"):
        assert authorize(refused) is None, refused
    assert static_token("é-unicode")("Bearer é-unicode") is not None


def test_without_a_token_everyone_may_call():
    for header in (None, "Bearer anything", "garbage"):
        assert static_token(None)(header) is ANONYMOUS
        assert static_token("")(header) is ANONYMOUS


class NoParams(BaseModel):
    pass


def named_tokens(header: str | None) -> Caller | None:
    """A check other than the static token: two named holders."""
    names = {"alice-token": "alice", "bob-token": "bob"}
    given = bearer_token(header)
    return Caller(names[given], frozenset({"read"})) if given in names else None


def test_the_json_rpc_transport_asks_the_check_it_is_given():
    endpoint = Endpoint([RpcMethod("ping", NoParams, lambda context, params: "pong")], None)
    server = RpcHTTPServer(endpoint, port=0, authorize=named_tokens)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        body = {"jsonrpc": "2.0", "method": "ping", "id": 1}
        for token, status in (("alice-token", 200), ("bob-token", 200), ("carol", 401)):
            headers = {"Authorization": f"Bearer {token}"}
            response = httpx.post(server.url, json=body, headers=headers, timeout=10)
            assert response.status_code == status, token
        assert httpx.post(server.url, json=body, timeout=10).status_code == 401
        assert httpx.get(server.dashboard_url, timeout=10).status_code == 200  # no data there
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_mcp_transport_asks_the_check_and_passes_the_caller_on():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope.get("headscope.caller"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def request(header: str | None) -> int:
        transport = httpx.ASGITransport(app=RequireCaller(app, named_tokens))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"Authorization": header} if header else {}
            return (await client.post("/mcp", headers=headers)).status_code

    assert anyio.run(request, "Bearer alice-token") == 200
    assert seen == [Caller("alice", frozenset({"read"}))]
    assert anyio.run(request, "Bearer nope") == 401
    assert anyio.run(request, None) == 401
    assert len(seen) == 1  # refused requests never reach the MCP app
