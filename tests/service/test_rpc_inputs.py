"""Bad input over JSON-RPC, on a real server: broken model files, numbers and names
out of range, strict analysis params, runs that params name. Each gets its
documented error code (never -32603) and stores nothing."""

from __future__ import annotations

import random

import pytest

from helpers.rpc import RpcError, Server

TINY_DETECTOR = {"n_random": 1, "random_length": 6, "repeats": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with a succeeded head-detector run on tiny-llama and on tiny-qwen2."""
    folder = tmp_path_factory.mktemp("rpc-inputs")
    process = Server(folder / "inputs.db", env={"HEADSCOPE_LOAD_PLUGINS": ""})
    process.folder = folder
    try:
        client = process.client()
        process.runs = {}
        for model in ("tiny-llama", "tiny-qwen2"):
            run_id = client.call(
                "runs.submit", analysis="head-detector", model=model, params=TINY_DETECTOR
            )["run_id"]
            document = client.wait_for(run_id, ("succeeded", "failed"))
            assert document["run"]["status"] == "succeeded", document["run"]["error"]
            process.runs[model] = run_id
        client.close()
        yield process
    finally:
        assert process.stop() == 0


@pytest.fixture
def client(server):
    client = server.client()
    yield client
    client.close()


@pytest.fixture
def rejecting(client):
    """A client whose requests must all be rejected: no run is stored meanwhile."""
    total = client.call("runs.list")["total"]
    yield client
    assert client.call("runs.list")["total"] == total, "a rejected request stored a run"


def error_of(client, method: str, **params) -> RpcError:
    with pytest.raises(RpcError) as raised:
        client.call(method, **params)
    return raised.value


def test_broken_model_files_are_model_errors(server, rejecting):
    folder = server.folder
    not_gguf = folder / "c.gguf"
    not_gguf.write_bytes(random.Random(0).randbytes(4096))
    bad_config = folder / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    no_weights = folder / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    for path, expected in [
        (not_gguf, "c.gguf is not a GGUF file"),
        (bad_config, "config.json is not JSON"),
        (no_weights, "no-weights has no weights"),
    ]:
        for method, params in [
            ("runs.submit", {"analysis": "head-detector", "model": str(path)}),
            ("models.load", {"name": str(path)}),
        ]:
            error = error_of(rejecting, method, **params)
            assert error.code == -32006 and expected in error.message, (method, error)


def test_numbers_and_names_out_of_range_are_invalid_params(rejecting):
    huge = 2**63
    for method, params, field in [
        ("runs.get", {"run_id": huge}, "run_id"),
        ("runs.cancel", {"run_id": huge}, "run_id"),
        ("runs.list", {"offset": huge}, "offset"),
        ("findings.query", {"metric": "induction", "offset": huge}, "offset"),
        ("findings.query", {"run_id": huge}, "run_id"),
        ("runs.compare", {"run_a": 1, "run_b": huge}, "run_b"),
        ("runs.submit", {"analysis": "head-detector", "seed": -1}, "seed"),
        ("runs.submit", {"analysis": "head-detector", "max_memory": "lots"}, "max_memory"),
        ("runs.submit", {"analysis": "head-detector", "max_memory": 0}, "max_memory"),
        ("runs.submit", {"analysis": "head-detector", "model": "m" * 900_000}, "model"),
        ("models.load", {"name": "m" * 900_000}, "name"),
        ("runs.list", {"model": "m" * 201}, "model"),
        ("analyses.describe", {"name": "a" * 201}, "name"),
    ]:
        error = error_of(rejecting, method, **params)
        assert error.code == -32602, (method, error)
        assert field in [item["field"] for item in error.data["errors"]], (method, error.data)


def test_a_memory_budget_is_a_run_option(server):
    client = server.client()
    try:
        run_id = client.call(
            "runs.submit",
            analysis="retrieval-heads",
            model="tiny-llama",
            params={"lengths": [250], "depths": [50], "mask_top_k": [], "max_new_tokens": 4},
            max_memory="1KB",  # too small for two prompts: one at a time
        )["run_id"]
        document = client.wait_for(run_id, ("succeeded", "failed"))
        assert document["run"]["status"] == "succeeded", document["run"]["error"]
        assert document["metrics"]["tests_run"] == 4
    finally:
        client.close()


def test_analysis_params_are_strict(rejecting):
    for value in ("3", True, 2.0):
        error = error_of(
            rejecting,
            "runs.submit",
            analysis="head-detector",
            model="tiny-llama",
            params={**TINY_DETECTOR, "n_random": value},
        )
        assert error.code == -32602
        assert error.data["errors"] == [
            {"field": "params.n_random", "message": "Input should be a valid integer"}
        ]


def test_runs_named_by_params_are_checked_at_submit(server, rejecting):
    llama = server.runs["tiny-llama"]
    for analysis, params, field, expected in [
        ("attention-modulation", {"from_run": 99}, "params.from_run", "no run with id 99"),
        ("retrieval-heads", {"scores_from": 99}, "params.scores_from", "no run with id 99"),
        ("sae-circuit", {"reference": "99"}, "params.reference", "no run with id 99"),
        ("sae-circuit", {"reference": 99}, "params.reference", "no run with id 99"),
        ("retrieval-heads", {"scores_from": llama}, None, "no head scores named"),
    ]:
        error = error_of(
            rejecting, "runs.submit", analysis=analysis, model="tiny-llama", params=params
        )
        assert error.code == -32602 and expected in error.message, error
        assert field is None or error.data["errors"][0]["field"] == field
    other = error_of(
        rejecting,
        "runs.submit",
        analysis="sae-circuit",
        model="tiny-gpt2",
        params={"reference": llama},
    )
    assert other.code == -32602 and "is on tiny-llama, not tiny-gpt2" in other.message


def test_checks_that_need_the_model_fail_the_run_at_its_start(client):
    run_id = client.call(
        "runs.submit",
        analysis="sae-circuit",
        model="tiny-llama",
        params={
            "reference": "auto",
            "reference_top_k": 15,
            "n_examples": 4,
            "steps": 2,
            "seeds": 1,
        },
    )["run_id"]
    run = client.wait_for(run_id, ("succeeded", "failed"))["run"]
    assert run["status"] == "failed" and run["started_at"] is None
    assert run["error"].startswith("reference_top_k: 15 is not below tiny-llama's 12 heads")


def test_compare_refuses_runs_of_different_shapes(server, rejecting):
    error = error_of(
        rejecting, "runs.compare", run_a=server.runs["tiny-llama"], run_b=server.runs["tiny-qwen2"]
    )
    assert error.code == -32602 and "head sets of different shapes do not compare" in error.message


def test_a_json_list_is_a_tuple(client):
    submitted = client.call(
        "runs.submit",
        analysis="attention-modulation",
        model="tiny-llama",
        params={"selection": "list", "heads": [[2, 1]], "controls": False, "generate": False},
    )
    assert client.call("runs.get", run_id=submitted["run_id"])["run"]["params"]["heads"] == [[2, 1]]
    client.call("runs.cancel", run_id=submitted["run_id"])
    client.wait_for(submitted["run_id"], ("cancelled", "succeeded", "failed"))


@pytest.fixture
def plugin_env(plugin_path):
    return {"PYTHONPATH": str(plugin_path), "HEADSCOPE_LOAD_PLUGINS": "example"}


def test_a_queued_run_may_be_named_an_ended_one_not(tmp_path, plugin_env):
    """Runs on one model execute in order: a run may build on one still queued."""
    server = Server(tmp_path / "queued.db", env=plugin_env)
    client = server.client()
    try:
        wait = {"analysis": "example-wait", "model": "tiny-llama", "params": {"seconds": 60}}
        running = client.call("runs.submit", **wait)["run_id"]
        queued = client.call("runs.submit", **wait)["run_id"]
        building = client.call(
            "runs.submit",
            analysis="attention-modulation",
            model="tiny-llama",
            params={"from_run": queued},
        )["run_id"]
        for run_id in (building, queued, running):
            client.call("runs.cancel", run_id=run_id)
        client.wait_for(running, ("cancelled",), timeout=30)
        error = error_of(
            client,
            "runs.submit",
            analysis="attention-modulation",
            model="tiny-llama",
            params={"from_run": queued},
        )
        assert (
            error.code == -32602 and f"run {queued} cancelled: it has no results" in error.message
        )
        assert client.call("runs.list")["total"] == 3
    finally:
        client.close()
        assert server.stop() == 0
