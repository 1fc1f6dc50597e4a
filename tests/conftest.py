"""Shared fixtures: an isolated data directory, the real model, the plugin packages.

Plain helpers (tiny model handles, references, CLI and RPC runners) live in `helpers`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path, monkeypatch):
    """Every test gets its own findings database; model caches stay shared."""
    monkeypatch.setenv("HEADSCOPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("HEADSCOPE_DB", raising=False)
    monkeypatch.setenv("HEADSCOPE_LOAD_PLUGINS", os.environ.get("HEADSCOPE_TEST_PLUGINS", ""))
    yield


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model, converted once into the user cache."""
    from headscope.core.models import load_model

    return load_model("smollm2-135m")


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def plugin_path(tmp_path_factory):
    """The example and broken plugin packages, pip-installed into a private folder."""
    target = tmp_path_factory.mktemp("plugins")
    for name in ("headscope-example-plugin", "headscope-broken-plugin"):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--disable-pip-version-check",
                "--target",
                str(target),
                str(FIXTURES / name),
            ],
            check=True,
            capture_output=True,
        )
    return target
