"""Hub ids load from the local Hugging Face cache without network."""

from __future__ import annotations

import pytest

from headscope.core.devices import Placement
from headscope.core.errors import ModelUnavailableError
from headscope.core.model_sources import HubRepo
from headscope.core.models import load_model
from headscope.core.tiny import build_tiny_model, byte_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding `example/tiny-llama` as a downloaded snapshot."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--example--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    build_tiny_model("llama").save_pretrained(snapshot)
    byte_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_hub_id_loads_from_the_local_cache_offline(hub_cache):
    assert HubRepo("example/tiny-llama").is_ready()
    handle = load_model("example/tiny-llama")
    assert handle.cache_path == hub_cache and handle.revision == COMMIT
    assert handle.adapter.family == "llama" and handle.n_layers == 3
    half = load_model("example/tiny-llama", placement=Placement("cpu", "bfloat16"))
    assert half.info()["dtype"] == "bfloat16"


def test_uncached_hub_id_offline_is_a_clear_error(hub_cache):
    assert not HubRepo("example/absent").is_ready()
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE=1 is set"):
        load_model("example/absent")
