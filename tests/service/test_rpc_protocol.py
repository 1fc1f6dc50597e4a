"""The JSON-RPC layer in-process: error mapping, sanitising, encoding, framing, discovery."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from pathlib import Path

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict

from headscope.core.errors import InvalidParamsError, UnknownModelError
from headscope.core.rpc import errors as codes
from headscope.core.rpc.http import check_binding, is_loopback
from headscope.core.rpc.protocol import Endpoint, RpcMethod
from headscope.core.rpc.stdio import serve_stdio

DOCS = Path(__file__).parents[2] / "docs" / "rpc.md"


class Echo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    value: int = 0


def _raise(error: Exception):
    def handler(context, params):
        raise error

    return handler


ENDPOINT = Endpoint(
    [
        RpcMethod("echo", Echo, lambda context, params: {"value": params.value, "ctx": context}),
        RpcMethod("nan", Echo, lambda context, params: [float("nan"), float("inf"), (1, 2)]),
        RpcMethod("object", Echo, lambda context, params: object()),
        RpcMethod("bug", Echo, _raise(RuntimeError("secret path /home/x and password"))),
        RpcMethod("model", Echo, _raise(UnknownModelError("unknown model 'm'"))),
        RpcMethod(
            "params", Echo, _raise(InvalidParamsError("bad", [{"field": "x", "message": "m"}]))
        ),
    ],
    context="the-context",
)


def call(method: str, params=None, id=1):  # noqa: A002
    message = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        message["params"] = params
    return json.loads(ENDPOINT.handle(json.dumps(message)))


def test_results_are_json_safe_and_the_context_reaches_methods():
    assert call("echo", {"value": 3})["result"] == {"value": 3, "ctx": "the-context"}
    assert call("nan")["result"] == [None, None, [1, 2]]


def test_internal_errors_are_logged_never_sent(caplog):
    with caplog.at_level(logging.ERROR, logger="headscope.rpc"):
        for method in ("bug", "object"):
            reply = call(method)
            assert reply["error"]["code"] == codes.INTERNAL_ERROR
            assert reply["error"]["message"] == "Internal error"
            assert "secret" not in json.dumps(reply)
            assert reply["error"]["data"]["ref"] in caplog.text
    assert "RuntimeError: secret path" in caplog.text  # the traceback stays in the log


def test_user_errors_map_to_documented_codes():
    assert call("model")["error"] == {"code": codes.UNKNOWN_MODEL, "message": "unknown model 'm'"}
    assert call("params")["error"]["data"] == {"errors": [{"field": "x", "message": "m"}]}
    wrong = call("echo", {"value": True})["error"]
    assert wrong["code"] == codes.INVALID_PARAMS
    assert wrong["data"]["errors"][0]["field"] == "value"
    assert call("echo", {"context": 1})["error"]["code"] == codes.INVALID_PARAMS


def test_messages_that_break_the_parser_or_the_library_get_sanitised_errors(monkeypatch):
    nested = ENDPOINT.handle("[" * 100_000)
    assert json.loads(nested)["error"]["code"] == codes.PARSE_ERROR

    def broken(*args, **kwargs):
        raise RuntimeError("library internals /secret")

    monkeypatch.setattr("jsonrpcserver.dispatcher.dispatch_deserialized", broken)
    reply = call("echo", {"value": 1}, id=9)
    assert reply["error"]["code"] == codes.INTERNAL_ERROR and "secret" not in json.dumps(reply)
    assert reply["id"] == 9


def test_nan_and_infinity_are_not_json():
    for body in ('{"jsonrpc": "2.0", "method": "echo", "id": NaN}', "[Infinity]", "-Infinity"):
        reply = json.loads(ENDPOINT.handle(body))
        assert reply["error"]["code"] == codes.PARSE_ERROR and reply["id"] is None, body


def test_a_batch_is_answered_item_by_item():
    body = json.dumps(
        [
            {"jsonrpc": "2.0", "method": "echo", "params": {"value": 1}, "id": 1},
            {"jsonrpc": "2.0", "method": "bug", "id": 2},
            {"jsonrpc": "2.0", "method": "echo", "params": {"value": "x"}, "id": 3},
            [{"jsonrpc": "2.0", "method": "echo", "id": 4}],  # a nested batch is invalid
            {"jsonrpc": "2.0", "method": "echo"},  # a notification
        ]
    )
    replies = json.loads(ENDPOINT.handle(body))
    assert [r.get("id") for r in replies] == [1, 2, 3, None]
    assert replies[0]["result"]["value"] == 1
    assert [r["error"]["code"] for r in replies[1:]] == [-32603, -32602, -32600]
    assert ENDPOINT.handle(json.dumps([{"jsonrpc": "2.0", "method": "echo"}])) is None


def test_stdio_frames_one_message_per_line_and_refuses_long_lines():
    lines = [
        json.dumps({"jsonrpc": "2.0", "method": "echo", "params": {"value": 5}, "id": 1}),
        "",
        json.dumps({"jsonrpc": "2.0", "method": "echo", "params": {"value": 7}}),
        "x" * 5000,
        "{nope",
        json.dumps({"jsonrpc": "2.0", "method": "echo", "id": "last"}),
    ]
    source = io.BytesIO(("\n".join(lines) + "\n").encode())
    sink = io.BytesIO()
    serve_stdio(ENDPOINT, source, sink, threading.Event(), max_bytes=1024)
    replies = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert replies[0]["result"]["value"] == 5
    assert replies[1]["error"]["code"] == codes.REQUEST_TOO_LARGE
    assert replies[2]["error"]["code"] == codes.PARSE_ERROR
    assert replies[3]["id"] == "last" and len(replies) == 4


def test_only_loopback_binds_without_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    check_binding("127.0.0.1", None)
    check_binding("0.0.0.0", "token")
    with pytest.raises(Exception, match="token"):
        check_binding("0.0.0.0", None)


@pytest.mark.parametrize("token", [None, "token"])
def test_a_host_that_names_no_address_says_so(token):
    with pytest.raises(Exception, match="not an address or a known host name"):
        check_binding("not a host", token)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_openrpc_document_has_the_openrpc_shape(plugin_path, monkeypatch):
    """Validated by an independent model of the OpenRPC spec (the `openrpc` package)."""
    import openrpc

    from headscope.core.plugins import build_registry
    from headscope.core.rpc.methods import service_methods
    from headscope.core.rpc.openrpc import openrpc_document

    monkeypatch.syspath_prepend(str(plugin_path))
    monkeypatch.setenv("HEADSCOPE_LOAD_PLUGINS", "example")
    registry = build_registry()
    assert {"head-detector", "example-wait", "example-norms"} <= set(registry.analyses)
    METHODS = service_methods(registry)  # noqa: N806
    document = openrpc_document(METHODS, registry)
    parsed = openrpc.OpenRPC.model_validate(document)
    assert [m.name for m in parsed.methods] == [m.name for m in METHODS]
    json.dumps(document, allow_nan=False)
    schemas = document["components"]["schemas"]
    for ref in set(_refs(document)):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas, ref
    for name in registry.analyses:
        assert f"analysis.{name}.params" in schemas
    for method in document["methods"]:
        for descriptor in [*method["params"], method["result"]]:
            jsonschema.Draft202012Validator.check_schema(descriptor["schema"])
        for error in method["errors"]:
            assert error["code"] in codes.ERRORS


def test_reference_documents_every_method_and_error_code():
    from headscope.core.plugins import build_registry
    from headscope.core.rpc.methods import service_methods

    METHODS = service_methods(build_registry())  # noqa: N806
    text = DOCS.read_text()
    headings = re.findall(r"^### `([a-z.]+)`", text, flags=re.MULTILINE)
    assert headings == [m.name for m in METHODS]
    for code in codes.ERRORS:
        assert f"| {code} |" in text, code


def test_request_check_agrees_with_the_json_rpc_schema():
    from jsonrpcserver.main import default_validator

    from headscope.core.rpc.protocol import check_request

    base = {"jsonrpc": "2.0", "method": "m"}
    cases = [
        base,
        {**base, "id": 1},
        {**base, "id": "a"},
        {**base, "id": None},
        {**base, "id": 1.5},
        {**base, "id": True},
        {**base, "id": {}},
        {**base, "params": []},
        {**base, "params": {}},
        {**base, "params": "x"},
        {**base, "params": None},
        {**base, "extra": 1},
        {"jsonrpc": "1.0", "method": "m"},
        {"jsonrpc": "2.0", "method": 5},
        {"jsonrpc": "2.0"},
        {"method": "m"},
    ]
    for case in cases:
        verdicts = []
        for check in (default_validator, check_request):
            try:
                check(case)
                verdicts.append(True)
            except Exception:
                verdicts.append(False)
        assert verdicts[0] == verdicts[1], case


def test_serve_rejects_bad_options_in_one_line(capsys):
    from helpers.cli import run_cli

    for args, problem in [
        (("--port", "70000"), "not a TCP port"),
        (("--max-request-bytes", "10"), "at least 1024"),
        (("--torch-threads", "0"), "at least 1"),
        (("--format", "xml"), "unknown format"),
    ]:
        result = run_cli(capsys, "serve", *args)
        assert result.code == 1 and problem in result.err and "Traceback" not in result.err


def test_serve_needs_room_for_one_queued_run(capsys):
    from helpers.cli import run_cli

    result = run_cli(capsys, "serve", "--max-queued", "0")
    assert result.code == 1 and "--max-queued must be at least 1" in result.err


def test_queue_full_is_a_documented_error_of_runs_submit():
    from headscope.core.plugins import build_registry
    from headscope.core.rpc.methods import service_methods
    from headscope.core.workers import QueueFullError

    (submit,) = [m for m in service_methods(build_registry()) if m.name == "runs.submit"]
    assert codes.QUEUE_FULL in submit.errors
    assert codes.error_object(QueueFullError(5)) == (
        codes.QUEUE_FULL,
        "the queue is full: 5 runs are waiting; submit again when some have started, or "
        "cancel some",
        {"max_queued": 5},
    )
