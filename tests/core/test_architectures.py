"""Architecture adapters: every supported family has one, and others are named."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from headscope.core.architectures import Gemma2Adapter, Phi3Adapter, adapter_for
from headscope.core.errors import HeadscopeError
from headscope.core.tiny import TINY_FAMILIES, tiny_config


def test_every_tiny_family_has_its_adapter():
    families = {name: type(adapter_for(tiny_config(name))) for name in TINY_FAMILIES}
    assert families["phi3"] is Phi3Adapter and families["gemma2"] is Gemma2Adapter
    assert set(TINY_FAMILIES) >= {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"}


def test_fused_phi3_projection_slices_cover_q_then_k_then_v():
    adapter = adapter_for(tiny_config("phi3"))
    root = SimpleNamespace(
        model=SimpleNamespace(layers=[SimpleNamespace(self_attn=SimpleNamespace(qkv_proj="f"))])
    )
    q, k, v = (part(root, 0).out_slice for part in (adapter.q_proj, adapter.k_proj, adapter.v_proj))
    assert (q.start, q.stop, k.start, k.stop, v.start, v.stop) == (0, 64, 64, 96, 96, 128)


def test_unsupported_architecture_names_the_supported_families():
    with pytest.raises(HeadscopeError, match="'mamba'.*Llama, Mistral, Qwen2, Qwen3, Gemma 2"):
        adapter_for(SimpleNamespace(model_type="mamba"))
