"""Tiny model handles shared across tests."""

from __future__ import annotations

_TINY: dict[str, object] = {}


def tiny_handle(family: str):
    """A tiny model handle per family, loaded once per test session."""
    from headscope.core.models import load_model

    if family not in _TINY:
        _TINY[family] = load_model(f"tiny-{family}")
    handle = _TINY[family]
    handle.remote = False
    return handle
