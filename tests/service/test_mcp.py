"""`headscope mcp` as an agent sees it: a real process, the mcp SDK's own stdio client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import pytest
from mcp import MCPError

from headscope.core.runs import FindingsQuery
from headscope.storage.store import Store

from helpers.cli import run_cli
from helpers.mcp import mcp_session

TINY_DETECTOR = {"model": "tiny-llama", "n_random": 1, "random_length": 4}
RPC_TOOLS = {
    "models_list",
    "runs_get",
    "runs_list",
    "runs_cancel",
    "findings_query",
    "findings_head",
    "runs_compare",
    "generate_steer",  # registered by the context family
}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One server for the module, with a finished head-detector run on tiny-llama."""
    db = tmp_path_factory.mktemp("mcp") / "mcp.db"
    with mcp_session(db, env={"HEADSCOPE_LOAD_PLUGINS": ""}) as session:
        session.db = db
        session.submitted = session.call("run_head_detector", **TINY_DETECTOR)
        session.run_id = session.submitted.structured_content["run_id"]
        session.finished = session.wait_for(session.run_id)
        yield session


def error_of(result) -> dict:
    """The JSON-RPC error object a failed tool call carries."""
    assert result.is_error, result.content
    return result.structured_content["error"]


def test_tools_are_the_analyses_and_the_rpc_methods(session):
    from headscope.core.plugins import build_registry
    from headscope.plugins.head_detector import HeadDetector

    registry = build_registry()
    tools = session.tools()
    analyses = {"run_" + name.replace("-", "_") for name in registry.analyses}
    assert set(tools) == analyses | RPC_TOOLS

    detector = tools["run_head_detector"]
    fields = set(HeadDetector.Params.model_fields)
    assert set(detector.input_schema["properties"]) == fields | {"model", "seed"}
    assert detector.input_schema["properties"]["model"]["default"] == "smollm2-135m"
    assert detector.description.startswith(HeadDetector.summary)
    assert "runs_get" in detector.description and "induction" in detector.description
    assert tools["findings_query"].input_schema == FindingsQuery.model_json_schema()


def test_a_run_is_submitted_polled_and_read(session):
    run_id = session.run_id
    assert not session.submitted.is_error
    assert session.submitted.structured_content == {"run_id": run_id, "status": "queued"}
    assert not session.finished.is_error
    assert session.finished.structured_content["run"]["status"] == "succeeded"

    document = session.read_json(f"headscope://runs/{run_id}")
    assert document["run"]["params"]["n_random"] == 1
    assert len(document["head_scores"]) == 3 * 4 * 4  # layers x heads x metrics
    full = session.call("runs_get", run_id=run_id)
    assert json.loads(full.content[0].text) == full.structured_content == document

    top = session.call("findings_query", run_id=run_id, limit=5).structured_content
    assert top["metric"] == "induction"
    assert top["heads"] == Store(str(session.db)).top_heads("induction", run_id=run_id, limit=5)
    same = session.call("runs_compare", run_a=run_id, run_b=run_id).structured_content
    assert same["jaccard"] == 1.0

    media_type, png = session.read(f"headscope://runs/{run_id}/heatmaps/induction")
    assert media_type == "image/png" and png.startswith(b"\x89PNG\r\n\x1a\n")
    (stored,) = [a for a in document["artifacts"] if a["name"] == "induction.png"]
    media_type, data = session.read(f"headscope://runs/{run_id}/artifacts/induction.png")
    assert media_type == "image/png" and data == open(stored["path"], "rb").read()

    uris = {resource.uri for resource in session.resources()}
    assert {
        f"headscope://runs/{run_id}",
        f"headscope://runs/{run_id}/heatmaps/previous_token",
        f"headscope://runs/{run_id}/artifacts/sink_mass.png",
    } <= uris
    assert {t.uri_template for t in session.templates()} == {
        "headscope://runs/{run_id}",
        "headscope://runs/{run_id}/heatmaps/{metric}",
        "headscope://runs/{run_id}/artifacts/{name}",
    }
    models = json.loads(session.call("models_list").content[0].text)
    assert {"tiny-llama", "smollm2-135m"} <= {model["name"] for model in models}


@pytest.mark.parametrize(
    ("tool", "arguments", "code", "says"),
    [
        ("run_head_detector", {"model": "tiny-llama", "n_random": -1}, -32602, "n_random"),
        ("run_head_detector", {"model": "tiny-llama", "bogus": 1}, -32602, "bogus"),
        ("run_head_detector", {"model": "no-such-model"}, -32001, "no-such-model"),
        ("run_head_detector", {"seed": "7"}, -32602, "seed"),
        ("runs_get", {"run_id": "1"}, -32602, "run_id"),
        ("runs_get", {"run_id": 999999}, -32003, "999999"),
        ("runs_compare", {"run_a": 1, "run_b": 1, "top_k": 3, "threshold": 0.1}, -32602, "both"),
        ("findings_query", {"analysis": "nope"}, -32602, "metric"),
        ("no_such_tool", {}, -32602, "no_such_tool"),
    ],
)
def test_bad_arguments_are_tool_errors_and_store_nothing(session, tool, arguments, code, says):
    runs = session.call("runs_list").structured_content["total"]
    result = session.call(tool, **arguments)
    error = error_of(result)
    assert error["code"] == code and says in error["message"]
    assert result.content[0].text == error["message"]
    assert "Traceback" not in session.log.read_text()
    assert session.call("runs_list").structured_content["total"] == runs


def test_a_failed_run_is_a_tool_error(session):
    too_long = {"model": "tiny-llama", "random_length": 200, "repeats": 4}  # 512 positions
    run_id = session.call("run_head_detector", **too_long).structured_content["run_id"]
    polled = session.wait_for(run_id)
    assert polled.is_error and "512 positions" in polled.content[0].text
    assert polled.structured_content["run"]["status"] == "failed"
    error = error_of(session.call("findings_query", run_id=run_id))
    assert error["code"] == -32004 and error["data"]["status"] == "failed"


@pytest.mark.parametrize(
    ("uri", "code", "says"),
    [
        ("headscope://runs/999999", -32003, "999999"),
        ("headscope://runs/1/heatmaps/nope", -32602, "nope"),
        ("headscope://runs/1/artifacts/nope.png", -32602, "nope.png"),
        ("headscope://elsewhere", -32602, "headscope://runs/{run_id}"),
    ],
)
def test_bad_resources_are_errors_with_headscope_codes(session, uri, code, says):
    with pytest.raises(MCPError) as failed:
        session.read(uri)
    assert failed.value.code == code and says in failed.value.message
    assert session.tools()  # the connection goes on


def test_resource_pages_take_only_the_cursors_given(session):
    with pytest.raises(MCPError) as failed:
        session.portal.call(partial(session.client.list_resources, cursor="page two"))
    assert failed.value.code == -32602 and "page two" in failed.value.message
    last = session.portal.call(partial(session.client.list_resources, cursor="50"))
    assert last.resources == [] and last.next_cursor is None


def test_an_analysis_with_a_param_named_model_gets_no_tool(caplog):
    from pydantic import BaseModel

    from headscope.core.analysis import Analysis
    from headscope.core.mcp.tools import build_tools
    from headscope.core.plugins import Registry

    class ClashParams(BaseModel):
        model: str = "mine"

    class Clash(Analysis):
        name = "clash"
        Params = ClashParams

    registry = Registry()
    registry.analyses["clash"] = Clash
    tools = build_tools(registry)
    assert "run_clash" not in tools and "runs_get" in tools
    assert "analysis clash has params named ['model']" in caplog.text


def test_steered_generation_is_the_rpc_method(session):
    from headscope.core.models import load_model
    from headscope.plugins.context.steering import SteeringRequest, steer

    params = {
        "prompt": "Context: the sky is green today. Question: sky? Answer:",
        "spans": [{"text": "the sky is green today."}],
        "heads": [[1, 0], [2, 3]],
        "alpha": 2.0,
        "max_new_tokens": 6,
    }
    result = session.call("generate_steer", model="tiny-llama", **params)
    expected = steer(load_model("tiny-llama"), SteeringRequest.parse(params))
    assert result.structured_content == json.loads(json.dumps(expected.as_dict()))
    no_run = {"prompt": params["prompt"], "spans": params["spans"], "from_run": 999999}
    assert error_of(session.call("generate_steer", model="tiny-llama", **no_run))["code"] == -32003


def test_mcp_command_rejects_bad_options(capsys):
    result = run_cli(capsys, "mcp", "--torch-threads", "0")
    assert result.code == 1 and "--torch-threads must be at least 1" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize("stop", ["end of input", "SIGTERM"])
def test_the_server_stops_cleanly(tmp_path, stop):
    log = tmp_path / "mcp.log"
    command = [sys.executable, "-m", "headscope.cli", "mcp", "--db", str(tmp_path / "m.db")]
    with open(log, "wb") as err:
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err
        )
    try:
        deadline = time.monotonic() + 120
        while "headscope MCP on stdin/stdout" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        if stop == "SIGTERM":
            os.kill(process.pid, signal.SIGTERM)
        else:
            process.stdin.close()
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    assert process.stdout.read() == b""  # only messages go to stdout
    assert "headscope MCP stopped" in log.read_text()
