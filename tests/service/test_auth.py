"""Tokens and scopes: the one request check the HTTP transports share."""

from __future__ import annotations

import json
import threading

import anyio
import httpx
import pytest
from pydantic import BaseModel

from headscope.core.errors import InvalidParamsError
from headscope.core.mcp.http import RequireCaller
from headscope.core.rpc.auth import (
    SERVER_TOKEN_NAME,
    Caller,
    authenticator,
    bearer,
    check_scopes,
    new_token,
    token_hash,
)
from headscope.core.rpc.errors import FORBIDDEN
from headscope.core.rpc.http import RpcHTTPServer
from headscope.core.rpc.methods import METHODS, SCOPES, required_scope
from headscope.core.rpc.protocol import Endpoint, RpcMethod
from headscope.storage.store import Store


class _Nothing(BaseModel):
    pass


def test_scopes_are_levels():
    reader, submitter = Caller("r", frozenset({"read"})), Caller("s", frozenset({"submit"}))
    assert reader.allows("read") and not reader.allows("submit")
    assert submitter.allows("read") and submitter.allows("submit")
    assert not submitter.allows("admin")
    assert Caller("a", frozenset({"admin"})).allows("submit")


def test_every_built_in_method_has_its_scope_and_plugin_methods_need_submit():
    assert {method.name for method in METHODS} == set(SCOPES)
    assert required_scope("runs.submit") == required_scope("runs.cancel") == "submit"
    assert required_scope("generate.steer") == "submit"


def test_check_scopes_orders_and_refuses_unknown():
    assert check_scopes(["admin", "read", "read"]) == ["read", "admin"]
    with pytest.raises(InvalidParamsError, match="unknown scope 'write'"):
        check_scopes(["write"])


def test_server_token_and_stored_tokens(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'auth.db'}")
    token = new_token()
    store.create_token("bot", token_hash(token), ["submit"])
    check = authenticator("s3cret", store.token_by_hash, required=True)
    assert check({"Authorization": "Bearer s3cret"}).name == SERVER_TOKEN_NAME
    assert check({"Authorization": f"Bearer {token}"}) == Caller("bot", frozenset({"submit"}))
    assert check({}) is None
    assert check({"Authorization": "Bearer wrong"}) is None
    store.revoke_token("bot")
    assert check({"Authorization": f"Bearer {token}"}) is None
    assert token not in json.dumps(store.tokens(), default=str)  # only the hash is kept


def test_open_server_lets_anyone_in():
    assert authenticator(required=False)({}).allows("admin")


def test_a_method_beyond_the_scope_is_refused_with_its_code():
    calls = []
    method = RpcMethod("runs.submit", _Nothing, lambda context, params: calls.append(context))
    endpoint = Endpoint([method], "service", required_scope, lambda ctx, who: (ctx, who.name))
    request = json.dumps({"jsonrpc": "2.0", "method": "runs.submit", "params": {}, "id": 3})
    refused = json.loads(endpoint.handle(request, Caller("reader", frozenset({"read"}))))
    assert refused["error"]["code"] == FORBIDDEN and refused["id"] == 3
    assert refused["error"]["data"]["required"] == "submit"
    assert calls == []
    endpoint.handle(request, Caller("bot", frozenset({"submit"})))
    assert calls == [("service", "bot")]
    endpoint.handle(request)  # stdio and in-process callers: no check
    assert calls[-1] == "service"


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
def test_bearer_reads_only_bearer_headers(header, token):
    assert bearer({} if header is None else {"Authorization": header}) == token


def test_the_server_token_is_compared_whole():
    check = authenticator("s3cret", required=True)
    for refused in ("", "Bearer wrong", "Bearer s3cre", "Bearer s3cret2", "Basic s3cret"):
        assert check({"Authorization": refused}) is None, refused
    assert authenticator("é-unicode")({"Authorization": "Bearer é-unicode"}) is not None


def named_tokens(headers) -> Caller | None:
    """A check other than the server token: two named holders."""
    names = {"alice-token": "alice", "bob-token": "bob"}
    given = bearer(headers)
    return Caller(names[given], frozenset({"read"})) if given in names else None


def test_the_json_rpc_transport_asks_the_check_it_is_given():
    endpoint = Endpoint([RpcMethod("ping", _Nothing, lambda context, params: "pong")], None)
    server = RpcHTTPServer(endpoint, port=0, authenticate=named_tokens)
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
