"""The JSON-RPC service as clients see it: a real server process, a real HTTP client."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import pytest

from headscope.storage.store import Store

from helpers.cli import run_cli
from helpers.rpc import RpcError, Server, request

TINY_DETECTOR = {
    "n_random": 1,
    "random_length": 4,
    "prompts": ["The cat sat on the mat.", "A dog ran home."],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module, with a finished head-detector run on tiny-llama."""
    db = tmp_path_factory.mktemp("rpc") / "rpc.db"
    process = Server(db, env={"HEADSCOPE_LOAD_PLUGINS": ""})
    try:
        client = process.client()
        run_id = client.call(
            "runs.submit", analysis="head-detector", model="tiny-llama", params=TINY_DETECTOR
        )["run_id"]
        process.finished = client.wait_for(run_id, ("succeeded", "failed"))
        process.discover = client.call("rpc.discover")
        client.close()
        yield process
    finally:
        assert process.stop() == 0


def check_result(discover: dict, method: str, result) -> None:
    """The result validates against the schema rpc.discover publishes for it."""
    (entry,) = [m for m in discover["methods"] if m["name"] == method]
    schema = {**entry["result"]["schema"], "components": discover["components"]}
    jsonschema.Draft202012Validator(schema).validate(result)


def test_submit_poll_and_query_findings(server):
    document = server.finished
    run = document["run"]
    assert run["status"] == "succeeded", run["error"]
    assert run["params"]["n_random"] == 1 and run["progress_done"] == run["progress_total"]
    assert len(document["head_scores"]) == 3 * 4 * 4  # layers x heads x metrics
    check_result(server.discover, "runs.get", document)

    client = server.client()
    page = client.call("findings.query", run_id=run["id"], limit=5)
    check_result(server.discover, "findings.query", page)
    assert page["metric"] == "induction"  # head-detector's primary metric
    induction = sorted(
        (s for s in document["head_scores"] if s["metric"] == "induction"),
        key=lambda s: (-s["value"], s["layer"], s["head"]),
    )
    assert [(h["layer"], h["head"], h["value"]) for h in page["heads"]] == [
        (s["layer"], s["head"], s["value"]) for s in induction[:5]
    ]
    # the same numbers as the store itself, queried by model and by analysis
    store = Store(str(server.db))
    direct = store.top_heads("previous_token", model="tiny-llama", limit=12)
    for filters in ({"model": "tiny-llama"}, {"analysis": "head-detector"}):
        rows = client.call("findings.query", metric="previous_token", limit=12, **filters)
        assert rows["heads"] == direct
    second = client.call("findings.query", run_id=run["id"], limit=5, offset=5)
    assert [h["value"] for h in second["heads"]] == [s["value"] for s in induction[5:10]]
    ascending = client.call("findings.query", run_id=run["id"], order="asc", limit=1)
    assert ascending["heads"][0]["value"] == induction[-1]["value"]

    best = induction[0]
    head = client.call("findings.head", layer=best["layer"], head=best["head"], model="tiny-llama")
    check_result(server.discover, "findings.head", head)
    (entry,) = [r for r in head["runs"] if r["run_id"] == run["id"]]
    assert entry["scores"]["induction"] == best["value"]
    assert (entry["rank"], entry["heads"]) == (1, len(induction))

    listed = client.call("runs.list", analysis="head-detector", status="succeeded")
    check_result(server.discover, "runs.list", listed)
    assert listed["total"] >= 1 and run["id"] in [r["id"] for r in listed["runs"]]
    compared = client.call("runs.compare", run_a=run["id"], run_b=run["id"], top_k=3)
    check_result(server.discover, "runs.compare", compared)
    assert compared["jaccard"] == 1.0 and len(compared["shared_heads"]) == 3
    assert compared["correlation"]["pearson"] == pytest.approx(1.0)  # a run against itself

    for method, params in [
        ("plugins.list", {}),
        ("analyses.list", {}),
        ("analyses.describe", {"name": "head-detector"}),
        ("models.list", {}),
        ("models.load", {"name": "tiny-gpt2"}),
        ("models.unload", {"name": "tiny-gpt2"}),
    ]:
        check_result(server.discover, method, client.call(method, **params))
    client.close()


def test_run_times_carry_the_utc_offset(server):
    client = server.client()
    run_id = server.finished["run"]["id"]
    got = client.call("runs.get", run_id=run_id, head_scores=False)["run"]
    (listed,) = [r for r in client.call("runs.list")["runs"] if r["id"] == run_id]
    for run in (got, listed):
        for key in ("created_at", "started_at", "finished_at"):
            assert run[key].endswith("+00:00"), (key, run[key])
    client.close()


def test_serve_refuses_a_database_that_is_not_headscope_s(tmp_path):
    db = tmp_path / "notes.db"
    connection = sqlite3.connect(db)
    connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)")
    connection.commit()
    connection.close()
    with pytest.raises(RuntimeError, match="is not a headscope database"):
        Server(db)


def test_findings_top_answers_what_findings_query_answers(server, capsys):
    run_id = server.finished["run"]["id"]
    client = server.client()
    for options, params in [
        (("--run", str(run_id), "--limit", "5"), {"run_id": run_id, "limit": 5}),
        (
            ("--model", "tiny-llama", "--metric", "previous_token", "--order", "asc"),
            {"model": "tiny-llama", "metric": "previous_token", "order": "asc"},
        ),
        (
            ("--analysis", "head-detector", "--min-value", "0.05", "--offset", "2"),
            {"analysis": "head-detector", "min_value": 0.05, "offset": 2},
        ),
    ]:
        shown = run_cli(capsys, "findings", "top", *options, "-f", "json", "--db", str(server.db))
        assert shown.code == 0, shown.err
        assert shown.json() == client.call("findings.query", **params), options
    client.close()


def test_eight_concurrent_clients_get_consistent_answers(server):
    run_id = server.finished["run"]["id"]
    calls = [
        ("findings.query", {"run_id": run_id, "limit": 10}),
        ("runs.get", {"run_id": run_id, "head_scores": False}),
        ("runs.list", {"limit": 5}),
    ]
    first = server.client()
    expected = [first.call(method, **params) for method, params in calls]
    first.close()
    failures: list[str] = []

    def work() -> None:
        client = server.client()
        try:
            for _ in range(15):
                for (method, params), want in zip(calls, expected, strict=True):
                    got = client.call(method, **params)
                    if got != want:
                        failures.append(f"{method}: {got} != {want}")
        except Exception as error:
            failures.append(repr(error))
        finally:
            client.close()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures[:3]


def test_bad_messages_get_the_right_error_and_the_server_keeps_serving(server):
    client = server.client()

    def error_of(body) -> dict:
        reply = client.post(body)
        assert reply.status_code == 200, reply.text
        assert client.call("runs.list", limit=1)["total"] >= 1  # still serving
        return reply.json()["error"]

    assert error_of(b'{"jsonrpc": "2.0", "method": ')["code"] == -32700
    assert error_of(b"\xff\xfe not utf-8")["code"] == -32700
    assert error_of({"method": "runs.list", "id": 1})["code"] == -32600  # no "jsonrpc"
    assert error_of([])["code"] == -32600
    missing = error_of(request("runs.nope"))
    assert missing["code"] == -32601 and missing["data"] == "runs.nope"
    wrong_type = error_of(request("runs.get", {"run_id": "1"}))
    assert wrong_type["code"] == -32602
    assert wrong_type["data"]["errors"] == [
        {"field": "run_id", "message": "Input should be a valid integer"}
    ]
    assert error_of(request("runs.list", {"limit": 0}))["data"]["errors"][0]["field"] == "limit"
    assert error_of(request("runs.list", {"colour": "red"}))["code"] == -32602
    assert error_of(request("runs.list", [1, 2]))["code"] == -32602
    bad_analysis_param = error_of(
        request("runs.submit", {"analysis": "head-detector", "params": {"n_random": "many"}})
    )
    assert bad_analysis_param["code"] == -32602
    assert bad_analysis_param["data"]["errors"][0]["field"] == "params.n_random"
    assert error_of(request("runs.submit", {"analysis": "nope"}))["code"] == -32002
    unknown_model = request("runs.submit", {"analysis": "head-detector", "model": "nope"})
    assert error_of(unknown_model)["code"] == -32001
    assert error_of(request("runs.get", {"run_id": 999999}))["code"] == -32003
    assert error_of(request("findings.query", {"run_id": 999999}))["code"] == -32003
    assert error_of(request("models.load", {"name": "no-such-model"}))["code"] == -32001

    huge = client.post(request("runs.list", {"analysis": "x" * (2 * 1024 * 1024)}))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == -32011
    client = server.client()  # the server hung up on the huge request
    assert client.call("runs.list", limit=1)["total"] >= 1
    # a client that asks before sending (Expect: 100-continue) is refused up front
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    with socket.create_connection((host, port), timeout=30) as raw:
        raw.sendall(
            b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert raw.recv(4096).startswith(b"HTTP/1.1 413")

    batch = client.post(
        [
            request("runs.list", {"limit": 1}, id="ok"),
            request("runs.get", {"run_id": "x"}, id="bad-params"),
            {"jsonrpc": "2.0", "method": "runs.list"},  # a notification: no reply
            {"method": "no jsonrpc", "id": "invalid"},
            7,
            request("no.such.method", id="missing"),
            request("runs.get", {"run_id": 999999}, id="not-found"),
        ]
    ).json()
    by_id = {reply["id"]: reply for reply in batch}
    assert len(batch) == 6
    assert by_id["ok"]["result"]["total"] >= 1
    assert by_id["bad-params"]["error"]["code"] == -32602
    assert by_id["missing"]["error"]["code"] == -32601
    assert by_id["not-found"]["error"]["code"] == -32003
    assert sorted(r["error"]["code"] for r in batch if r["id"] is None) == [-32600, -32600]

    notification = client.post({"jsonrpc": "2.0", "method": "runs.list"})
    assert notification.status_code == 204 and notification.content == b""
    assert client.http.get(client.url).status_code == 405
    assert client.http.get(client.url.replace("/rpc", "/health")).json() == {"status": "ok"}
    assert client.call("runs.list", limit=1)["total"] >= 1
    client.close()


def test_a_run_that_does_not_fit_the_model_fails_with_its_reason(server):
    client = server.client()
    too_long = {"random_length": 200, "repeats": 4}  # 800 tokens; tiny-llama has 512
    run_id = client.call(
        "runs.submit", analysis="head-detector", model="tiny-llama", params=too_long
    )["run_id"]
    run = client.wait_for(run_id, ("succeeded", "failed"))["run"]
    assert run["status"] == "failed" and "512 positions" in run["error"]
    with pytest.raises(RpcError) as failed:
        client.call("findings.query", run_id=run_id)
    assert failed.value.code == -32004
    assert failed.value.data == {"run_id": run_id, "status": "failed", "error": run["error"]}
    client.close()


def test_steered_generation_matches_the_library_call(server):
    from headscope.core.models import load_model
    from headscope.plugins.context.steering import SteeringRequest, steer

    prompt = "Context: the sky is green today. Question: sky? Answer:"
    params = {
        "prompt": prompt,
        "spans": [{"text": "the sky is green today."}],
        "heads": [[1, 0], [2, 3]],
        "alpha": 2.0,
        "max_new_tokens": 6,
    }
    client = server.client()
    result = client.call("generate.steer", model="tiny-llama", **params)
    check_result(server.discover, "generate.steer", result)
    expected = steer(load_model("tiny-llama"), SteeringRequest.parse(params))
    assert result == json.loads(json.dumps(expected.as_dict()))
    assert result["modulation"]["heads"] == [[1, 0], [2, 3]]
    same = client.call("generate.steer", model="tiny-llama", **{**params, "alpha": 0.0})
    assert same["baseline_tokens"] == same["steered_tokens"]
    with pytest.raises(RpcError) as outside:
        client.call(
            "generate.steer", model="tiny-llama", **{**params, "spans": [{"chars": [0, 999]}]}
        )
    assert outside.value.code == -32602 and "999" in outside.value.message
    with pytest.raises(RpcError) as no_run:
        client.call(
            "generate.steer",
            model="tiny-llama",
            prompt=prompt,
            spans=params["spans"],
            from_run=999999,
        )
    assert no_run.value.code == -32003
    client.close()


def test_errors_send_no_internal_details(server):
    client = server.client()
    reply = client.post(request("runs.compare", {"run_a": 999999, "run_b": 1}))
    text = reply.text
    assert "Traceback" not in text and 'File "' not in text
    assert reply.json()["error"]["code"] == -32003
    client.close()


def test_openrpc_document_publishes_every_method_and_analysis_schema(server):
    from headscope.core.plugins import build_registry
    from headscope.core.rpc.methods import service_methods

    METHODS = service_methods(build_registry())  # noqa: N806
    document = server.discover
    assert [m["name"] for m in document["methods"]] == [m.name for m in METHODS]
    registry = build_registry()
    for name, cls in registry.analyses.items():
        published = document["components"]["schemas"][f"analysis.{name}.params"]
        assert published["properties"].keys() == cls.Params.model_json_schema()["properties"].keys()
    (submit,) = [m for m in document["methods"] if m["name"] == "runs.submit"]
    params = {p["name"]: p for p in submit["params"]}
    assert (
        params["analysis"]["required"] and "head-detector" in params["analysis"]["schema"]["enum"]
    )
    schema = {**params["params"]["schema"], "components": document["components"]}
    jsonschema.Draft202012Validator(schema).validate(TINY_DETECTOR)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate({"n_random": "many"})


def test_token_is_enforced_and_required_off_loopback(tmp_path):
    refused = subprocess.run(
        [sys.executable, "-m", "headscope.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HEADSCOPE_TOKEN": ""},
    )
    assert refused.returncode == 1
    assert "token" in refused.stderr and "Traceback" not in refused.stderr

    guarded = Server(tmp_path / "auth.db", "--token", "s3cret")
    try:
        anonymous = httpx.post(guarded.url, json=request("runs.list"))
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"] == "Bearer"
        assert anonymous.json()["error"]["code"] == -32010
        wrong = httpx.post(
            guarded.url, json=request("runs.list"), headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        assert guarded.client("s3cret").call("runs.list")["total"] == 0
    finally:
        assert guarded.stop() == 0


def test_stdio_answers_the_same_calls(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "headscope.cli", "serve", "--stdio", "--db", str(tmp_path / "s.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HEADSCOPE_LOAD_PLUGINS": ""},
    )

    def send(message) -> dict | list:
        line = message if isinstance(message, bytes) else json.dumps(message).encode()
        process.stdin.write(line + b"\n")
        process.stdin.flush()
        return json.loads(process.stdout.readline())

    try:
        assert "head-detector" in [a["name"] for a in send(request("analyses.list"))["result"]]
        submitted = send(
            request(
                "runs.submit",
                {"analysis": "head-detector", "model": "tiny-llama", "params": TINY_DETECTOR},
            )
        )
        run_id = submitted["result"]["run_id"]
        for _ in range(900):
            run = send(request("runs.get", {"run_id": run_id, "head_scores": False}))
            if run["result"]["run"]["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.2)
        assert run["result"]["run"]["status"] == "succeeded"
        top = send(request("findings.query", {"run_id": run_id, "limit": 3}))["result"]
        assert len(top["heads"]) == 3
        assert send(b"{not json")["error"]["code"] == -32700
        batch = send([request("runs.list", id=1), request("nope", id=2)])
        assert [("result" in r, r["id"]) for r in batch] == [(True, 1), (False, 2)]
        assert send(request("runs.list", {"limit": 1}))["result"]["total"] == 1
    finally:
        process.stdin.close()
        assert process.wait(timeout=60) == 0


def test_a_body_announced_larger_than_it_is_gets_413_quickly(server):
    host, port = httpx.URL(server.url).host, httpx.URL(server.url).port
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=30) as raw:
        raw.sendall(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n{}")
        reply = b"".join(iter(lambda: raw.recv(4096), b""))  # until the server closes
    assert reply.startswith(b"HTTP/1.1 413") and b"-32011" in reply
    assert time.monotonic() - started < 30  # well before the 60 s idle timeout
    assert server.client().call("runs.list", limit=1)["total"] >= 1
