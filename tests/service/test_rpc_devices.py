"""Device and precision over JSON-RPC: models.load and runs.submit."""

from __future__ import annotations

import time

import pytest
import torch

from helpers.rpc import RpcError, Server


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_placement_over_rpc(tmp_path):
    server = Server(tmp_path / "devices.db")
    client = server.client()
    try:
        info = client.call("models.load", name="tiny-gpt2", dtype="bfloat16")
        assert (info["device"], info["dtype"]) == ("cpu", "bfloat16")
        assert client.call("models.load", name="tiny-gpt2")["dtype"] == "float32"
        with pytest.raises(RpcError) as refused:
            client.call("runs.submit", analysis="head-detector", model="tiny-gpt2", device="cuda")
        assert refused.value.code == -32602 and "'cuda' is not available" in refused.value.message
        assert client.call("runs.list")["total"] == 0  # nothing stored
        run_id = client.call(
            "runs.submit",
            analysis="head-detector",
            model="tiny-gpt2",
            params={"n_random": 2, "random_length": 16, "prompts": ["a b a b"]},
            dtype="float16",
        )["run_id"]
        deadline = time.monotonic() + 120
        while (run := client.call("runs.get", run_id=run_id)["run"])["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert run["status"] == "succeeded", run["error"]
        assert run["summary"]["placement"]["dtype"] == "float16"
    finally:
        server.stop()
