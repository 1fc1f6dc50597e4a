"""Fixtures for the queue's tests: a worker environment with the example plugin."""

from __future__ import annotations

import os

import pytest

from helpers.queue import Workers


@pytest.fixture
def queue_env(plugin_path, tmp_path, monkeypatch):
    """The environment a worker needs to run the example plugin's slow analysis
    (this process submits it, so it sees the plugin too)."""
    monkeypatch.syspath_prepend(str(plugin_path))
    monkeypatch.setenv("HEADSCOPE_LOAD_PLUGINS", "example")
    return {
        **os.environ,
        "PYTHONPATH": str(plugin_path),
        "HEADSCOPE_LOAD_PLUGINS": "example",
        "HEADSCOPE_DATA_DIR": str(tmp_path / "data"),
    }


@pytest.fixture
def workers(postgres_url, queue_env):
    started = Workers(postgres_url, queue_env)
    yield started
    started.stop()
