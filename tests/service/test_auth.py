"""Tokens and scopes: the one request check the HTTP transports share."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from headscope.core.errors import InvalidParamsError
from headscope.core.rpc.auth import (
    SERVER_TOKEN_NAME,
    Caller,
    authenticator,
    check_scopes,
    new_token,
    token_hash,
)
from headscope.core.rpc.errors import FORBIDDEN
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
