"""Devices and precision: choosing them, loading on them, and primitives that take
their device from the tensors they touch."""

from __future__ import annotations

import functools

import pytest
import torch

from headscope.core import devices
from headscope.core import tracing as T
from headscope.core.devices import DeviceUnavailableError, Placement, resolve_placement
from headscope.core.models import ModelPool, builtin_models, load_model

from helpers.cli import run_cli
from helpers.models import tiny_handle

PROMPTS = ["Devices check, one.", "And two"]


@pytest.fixture(autouse=True)
def no_env_defaults(monkeypatch):
    monkeypatch.delenv(devices.DEVICE_ENV, raising=False)
    monkeypatch.delenv(devices.DTYPE_ENV, raising=False)


def test_auto_on_a_cpu_machine_is_cpu_float32(monkeypatch):
    monkeypatch.setattr(devices, "_cuda_count", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    assert resolve_placement() == Placement("cpu", "float32")
    assert resolve_placement("cpu", "bfloat16") == Placement("cpu", "bfloat16")
    assert resolve_placement("auto", "float16", "auto") == Placement("cpu", "float16")


@pytest.mark.parametrize("amx, expected", [(True, "bfloat16"), (False, "float32")])
def test_fast_is_bfloat16_only_on_cpus_that_multiply_it(monkeypatch, amx, expected):
    monkeypatch.setattr(devices, "_cuda_count", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    monkeypatch.setattr(devices, "cpu_multiplies_bfloat16", lambda: amx)
    assert resolve_placement("auto", "fast") == Placement("cpu", expected)
    assert resolve_placement("cpu", "FAST") == Placement("cpu", expected)


def test_fast_on_an_accelerator_is_its_natural_precision(monkeypatch):
    monkeypatch.setattr(devices, "_cuda_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_placement(None, "fast") == Placement("cuda:0", "bfloat16")


def test_auto_picks_the_accelerator_and_its_precision(monkeypatch):
    monkeypatch.setattr(devices, "_cuda_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_placement() == Placement("cuda:0", "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_placement().dtype == "float16"
    with pytest.raises(DeviceUnavailableError, match="bfloat16 is not supported"):
        resolve_placement("cuda:0", "bfloat16")
    monkeypatch.setattr(devices, "_cuda_count", lambda: 4)
    assert resolve_placement().device_map == "auto"  # several GPUs: shard
    with pytest.raises(DeviceUnavailableError, match=r"4 CUDA GPUs \(cuda:0..cuda:3\)"):
        resolve_placement("cuda:7")
    monkeypatch.setattr(devices, "_cuda_count", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert resolve_placement() == Placement("mps", "float16")


def test_environment_defaults(monkeypatch):
    monkeypatch.setenv(devices.DEVICE_ENV, "cpu")
    monkeypatch.setenv(devices.DTYPE_ENV, "bfloat16")
    assert resolve_placement() == Placement("cpu", "bfloat16")
    assert resolve_placement(dtype="float32").dtype == "float32"  # a request wins


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_unavailable_and_unknown_devices_are_clear_errors():
    with pytest.raises(DeviceUnavailableError, match="'cuda' is not available.*offers cpu"):
        resolve_placement("cuda")
    with pytest.raises(DeviceUnavailableError, match="unknown device 'tpu'"):
        resolve_placement("tpu")
    with pytest.raises(DeviceUnavailableError, match="unknown dtype 'int8'"):
        resolve_placement("cpu", "int8")
    with pytest.raises(DeviceUnavailableError, match="unknown device map"):
        resolve_placement("cpu", None, "sequential")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tiny_model_loads_and_traces_in_each_precision(dtype):
    handle = load_model("tiny-llama", placement=Placement("cpu", dtype))
    assert handle.dtype == devices.DTYPES[dtype]
    info = handle.info()
    assert (info["device"], info["devices"], info["dtype"]) == ("cpu", ["cpu"], dtype)
    size = devices.DTYPES[dtype].itemsize
    assert info["memory_bytes"] >= handle.parameter_count() * size
    batch = T.make_batch(handle, PROMPTS)
    result = T.forward(handle, batch, [T.AttentionRows([0, 2], [-1], output="probs")])
    rows = result.get("rows", 2)
    assert rows.dtype == torch.float32  # scores are float32 whatever the weights
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]))
    reference = tiny_handle("llama")
    expected = T.forward(reference, batch, [T.AttentionRows([0, 2], [-1], output="probs")])
    tolerance = 0 if dtype == "float32" else 0.05
    torch.testing.assert_close(rows, expected.get("rows", 2), atol=tolerance, rtol=0)


def test_pool_keeps_one_handle_per_device_and_dtype():
    pool = ModelPool(builtin_models())
    full = pool.get("tiny-gpt2", placement=Placement("cpu", "float32"))
    half = pool.get("tiny-gpt2", placement=Placement("cpu", "bfloat16"))
    assert full is not half and half.dtype == torch.bfloat16
    assert pool.get("tiny-gpt2", placement=Placement("cpu", "bfloat16")) is half
    assert pool.is_loaded("tiny-gpt2", Placement("cpu", "float32"))
    assert pool.unload("tiny-gpt2") and not pool.loaded()


def _elsewhere(item):
    """The item with its site callbacks run under another default device: a tensor
    it builds without taking the device from what it touches lands on `meta` and
    fails, as it would on a GPU (or across a sharded model's devices)."""
    for name in ("at_attention", "at_head_output"):
        method = getattr(item, name)

        @functools.wraps(method)
        def wrapped(*args, _method=method, **kwargs):
            with torch.device("meta"):
                return _method(*args, **kwargs)

        object.__setattr__(item, name, wrapped)
    return item


def _every_primitive(handle, batch):
    layers = list(range(handle.n_layers))
    source = T.forward(handle, batch, [T.HeadOutputs(layers)], logits_at=None)
    received = T.forward(handle, batch, [T.AttentionReceived([1])], logits_at=None)
    sinks = {1: received.get("received", 1) > 0.3}
    pattern = torch.ones(batch.size, batch.width, batch.width, dtype=torch.bool)
    means = T.mean_head_outputs(handle, batch, [0])
    return [
        [T.AttentionRows(layers, [0, -1], output="probs")],
        [T.AttentionRows(layers, [-1], output="argmax")],
        [T.AttentionPatternScores([1], patterns={"all": pattern})],
        [T.AttentionReceived(layers)],
        [T.HeadOutputs(layers, [1, -1]), T.HeadOutputs([0], reduce="mean", name="m")],
        [T.HeadAblation(T.head_map({0: [1]}), positions=[0])],
        [T.HeadAblation(T.head_map({0: [2]}), mode="mean", means=means)],
        [T.UniformAttention(T.head_map({1: [0, 3]}))],
        [T.HeadPatch(T.head_map({1: [1]}), {1: source.get("heads", 1) * 0.5}, positions=[0])],
        [T.RowHeadPatch([[(1, 0)], []], {1: source.get("heads", 1)}, [1, 0])],
        [T.AttentionBias(T.head_map({1: [2]}), [0, 1], 0.7, mode="scaled", query_from=1)],
        [T.AttentionBias(T.head_map({2: [0]}), [0], 2.0)],
        [T.SinkCalibration(T.head_map({1: [0, 1]}), sinks, beta=0.5)],
    ]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_primitives_take_devices_from_tensors(family):
    handle = tiny_handle(family)
    batch = T.make_batch(handle, PROMPTS)
    for items in _every_primitive(handle, batch):
        expected = T.forward(handle, batch, items)
        moved = T.forward(handle, batch, [_elsewhere(item) for item in items])
        torch.testing.assert_close(moved.logits, expected.logits)
    items = [
        T.AttentionBias(T.head_map({1: [0]}), [0, 2], 1.5),
        T.AttentionRows([1, 2], [-1], output="argmax"),
    ]
    expected = T.generate(handle, batch, 3, items, stop_ids=[])
    moved = T.generate(handle, batch, 3, [_elsewhere(item) for item in items], stop_ids=[])
    assert moved.tokens == expected.tokens


def test_cli_records_device_dtype_and_peak_memory(capsys, tmp_path):
    db = tmp_path / "d.db"
    result = run_cli(
        capsys, "run", "head-detector", "-m", "tiny-llama", "--dtype", "bfloat16",
        "-p", "n_random=2", "-p", "random_length=16", "-p", "prompts=[\"a b a b\"]",
        "--format", "json", "--db", db,
    )  # fmt: skip
    assert result.code == 0, result.err
    placement = result.json()["run"]["summary"]["placement"]
    assert placement["device"] == "cpu" and placement["dtype"] == "bfloat16"
    assert placement["peak_memory_bytes"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_refuses_an_unavailable_device_before_storing(capsys, tmp_path):
    db = tmp_path / "none.db"
    result = run_cli(capsys, "run", "head-detector", "-m", "tiny-llama", "--device", "cuda",
                     "--db", db)  # fmt: skip
    assert result.code != 0 and "'cuda' is not available" in result.err
    assert not db.exists()
    info = run_cli(capsys, "models", "info", "tiny-gpt2", "--dtype", "float16", "-f", "json")
    assert info.json()["dtype"] == "float16" and info.json()["memory_bytes"] > 0


def test_from_pretrained_gets_the_placement():
    from headscope.core.models import _from_pretrained_placement

    assert _from_pretrained_placement(Placement("cpu", "float32")) == {"dtype": torch.float32}
    assert _from_pretrained_placement(Placement("cuda:1", "float16")) == {
        "dtype": torch.float16,
        "device_map": "cuda:1",
    }
    sharded = _from_pretrained_placement(Placement("cuda:0", "bfloat16", "auto"))
    assert sharded == {"dtype": torch.bfloat16, "device_map": "auto"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["mcp"], ["worker"]])
def test_servers_refuse_an_unavailable_device_before_they_start(capsys, tmp_path, command):
    db = tmp_path / "none.db"
    result = run_cli(capsys, *command, "--device", "cuda:1", "--db", db)
    assert result.code != 0 and "'cuda:1' is not available" in result.err
    assert not db.exists()
    result = run_cli(capsys, *command, "--dtype", "float64", "--db", db)
    assert result.code != 0 and "unknown dtype 'float64'" in result.err


def test_a_servers_device_and_dtype_become_its_default(monkeypatch):
    from headscope.cli import use_default_placement
    from headscope.core.devices import DEVICE_ENV, DTYPE_ENV

    monkeypatch.setenv(DEVICE_ENV, "auto")  # recorded, so restored after the test
    monkeypatch.setenv(DTYPE_ENV, "auto")
    use_default_placement("cpu", "bfloat16")
    assert resolve_placement() == Placement("cpu", "bfloat16")
    assert resolve_placement(dtype="float32") == Placement("cpu", "float32")  # a request's own
