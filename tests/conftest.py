"""Shared fixtures: an isolated data directory, the real model, the plugin packages,
and an empty findings database on each backend (SQLite, a throwaway PostgreSQL).

Plain helpers (tiny model handles, references, CLI and RPC runners) live in `helpers`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.postgres import Cluster, ClusterUnavailable, unavailable

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


@pytest.fixture(scope="session")
def postgres_cluster():
    """A PostgreSQL server for the session, stopped at its end.

    Where none can be started, tests that need one fail when CI=true (CI must
    test PostgreSQL) and are skipped with the reason otherwise.
    """
    try:
        cluster, reason = Cluster.start(), None
    except ClusterUnavailable as error:
        cluster, reason = None, str(error)
    if cluster is None:
        unavailable(f"no PostgreSQL server: {reason}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster):
    """An empty database of its own on the session's PostgreSQL server."""
    name, url = postgres_cluster.create_database()
    yield url
    postgres_cluster.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty findings database, once per backend the store supports."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'findings.db'}"
    return request.getfixturevalue("postgres_url")
