"""The JSON-RPC layer under arbitrary input (property-based, hypothesis).

Arbitrary JSON, malformed requests, batches, random method names and params go to
the real method table over a real store and registry, in process. Every reply must
be a valid JSON-RPC 2.0 response whose error codes are documented, with no internal
error (every input here is the client's mistake, not a bug) and no traceback, and
the store must be exactly as it was.

The workers are closed before the first message, so a valid `runs.submit` is
answered "shutting down" without storing anything: any change to the store is a
bug. Only the tiny random models load (others are "unavailable", as on a machine
without their weights), and nothing may connect beyond the loopback address.
"""

from __future__ import annotations

import json
import socket
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headscope.core import models
from headscope.core.errors import ModelUnavailableError
from headscope.core.plugins import build_registry
from headscope.core.rpc import errors as codes
from headscope.core.rpc.methods import service_methods
from headscope.core.rpc.protocol import Endpoint
from headscope.core.rpc.service import Service
from headscope.storage.store import Store

from helpers.store import failed_run, finished_run, grid

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _guarded_connect(connect):
    def guarded(sock, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise OSError(f"no network in this test: {address[0]}")
        return connect(sock, address)

    return guarded


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """(endpoint, store, snapshot of the store before any message)."""
    folder = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HEADSCOPE_DATA_DIR", str(folder / "data"))
        patch.setenv("HEADSCOPE_LOAD_PLUGINS", "")
        patch.setattr(socket.socket, "connect", _guarded_connect(socket.socket.connect))
        load_spec = models.load_spec

        def tiny_only(spec, *args, **kwargs):
            if not spec.name.startswith("tiny-"):
                raise ModelUnavailableError(f"{spec.name}: only tiny models load here")
            return load_spec(spec, *args, **kwargs)

        patch.setattr(models, "load_spec", tiny_only)
        store = Store(str(folder / "fuzz.db"))
        finished_run(store, "tiny-llama", grid("induction", 3, 4, lambda l, h: l - h / 4))  # noqa: E741
        failed_run(store, "tiny-llama")
        registry = build_registry()
        service = Service.open(store, registry, torch_threads=1)
        service.pool.get("tiny-llama")  # the first load imports a lot; later ones are quick
        service.workers.close()
        try:
            yield Endpoint(service_methods(registry), service), store, snapshot(store)
        finally:
            service.close()


def snapshot(store) -> list:
    """Every run with its status, error and findings."""
    return [
        (run.id, run.status, run.error, store.head_scores(run.id), store.metrics(run.id))
        for run in store.list_runs(limit=1000)
    ]


# ----------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
#: values of each JSON type that get past the first checks: real names and ids,
#: near misses, and numbers beyond what SQL integers hold
NAMES = [
    "head-detector", "retrieval-heads", "context-heads", "tiny-llama", "tiny-gpt2", "smollm2",
    "induction", "previous_token", "org/name", "remote:org/name", "x.gguf", ".", "",
    "0.1,1.2", "all", "The cat sat on the mat.",
]  # fmt: skip
typed = {
    "string": st.sampled_from(NAMES),
    "integer": st.sampled_from([1, 2, 3, 1, 2, 3, 4, 0, -1, 2**63, -(2**63) - 1]),
    "number": st.sampled_from([0.0, 0.05, 0.5, -1.0, 1e308]),
    "boolean": st.booleans(),
    "array": st.sampled_from([[], [[0, 1]], [{"text": "cat"}], [{"positions": [0]}]]),
    "object": st.sampled_from([{}, {"n_random": 1}, {"lengths": [50]}]),
    "null": st.none(),
}


def field_values(schema: dict) -> st.SearchStrategy:
    """Mostly values of the field's own JSON types (or enum), now and then any JSON."""
    kinds = [schema, *schema.get("anyOf", [])]
    options = [typed[kind["type"]] for kind in kinds if kind.get("type") in typed]
    options += [st.sampled_from(kind["enum"]) for kind in kinds if "enum" in kind]
    return st.one_of(*options * 6, json_values)


schemas = {
    method.name: method.params.model_json_schema() for method in service_methods(build_registry())
}


def named_params(method) -> st.SearchStrategy:
    """Params by name: the method's required fields and some of its others."""
    schema = schemas.get(method, {}) if isinstance(method, str) else {}
    fields = {name: field_values(field) for name, field in schema.get("properties", {}).items()}
    required = set(schema.get("required", []))
    return st.fixed_dictionaries(
        {name: value for name, value in fields.items() if name in required},
        optional={name: value for name, value in fields.items() if name not in required},
    )


#: a well-formed envelope: a method of the table (or not) with params shaped like its own
known_methods = st.sampled_from(sorted(schemas))
calls = st.one_of(known_methods, known_methods, known_methods, st.text(max_size=16)).flatmap(
    lambda method: st.fixed_dictionaries(
        {
            "jsonrpc": st.just("2.0"),
            "method": st.just(method),
            "params": named_params(method),
            "id": st.integers(-5, 10**6),
        }
    )
)
#: anything shaped like a request: wrong versions, methods, params and ids, extra keys
malformed = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.just("2.0") | json_values,
        "method": known_methods | json_values,
        "params": json_values,
        "id": st.none() | st.integers() | st.text(max_size=6) | st.floats() | json_values,
        "extra": json_values,
    },
)
messages = st.one_of(
    calls.map(json.dumps),
    calls.map(json.dumps),
    calls.map(json.dumps),
    malformed.map(json.dumps),
    st.lists(calls | malformed | json_values, max_size=4).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.sampled_from(['{"jsonrpc": "2.0", "method": "runs.get", "id": NaN}', "[1, Infinity]"]),
)


# ----------------------------------------------------------------------------------
# the property
# ----------------------------------------------------------------------------------
def check_response(response) -> None:
    assert isinstance(response, dict) and response.get("jsonrpc") == "2.0", response
    assert set(response) in ({"jsonrpc", "result", "id"}, {"jsonrpc", "error", "id"}), response
    assert response["id"] is None or type(response["id"]) in (str, int, float), response
    if "error" in response:
        error = response["error"]
        assert {"code", "message"} <= set(error) <= {"code", "message", "data"}, error
        assert type(error["code"]) is int and error["code"] in codes.ERRORS, error
        assert isinstance(error["message"], str), error
        assert error["code"] != codes.INTERNAL_ERROR, error


def not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def notifications_only(message) -> bool:
    items = message if isinstance(message, list) else [message]
    return bool(items) and all(isinstance(i, dict) and "id" not in i for i in items)


@settings(
    max_examples=200,
    deadline=timedelta(seconds=5),
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=messages)
def test_every_message_gets_a_valid_documented_answer_and_stores_nothing(fuzzed, body):
    endpoint, store, before = fuzzed
    reply = endpoint.handle(body)
    try:
        message = json.loads(body, parse_constant=not_json)
    except ValueError:
        message = ...  # not JSON: there must be an answer
    if reply is None:
        assert notifications_only(message), body
    else:
        assert "Traceback" not in reply and 'File "' not in reply, reply
        parsed = json.loads(reply, parse_constant=not_json)
        if isinstance(message, list) and message:
            assert isinstance(parsed, list) and parsed, reply
            for response in parsed:
                check_response(response)
        else:
            check_response(parsed)
            if isinstance(message, dict) and "error" in parsed:
                if parsed["error"]["code"] != codes.INVALID_REQUEST:
                    assert parsed["id"] == message.get("id"), (message, parsed)
    assert snapshot(store) == before
