"""The PostgreSQL server the store's tests run on, and what happens without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.postgres import ClusterUnavailable, find_program, unavailable


def test_without_a_server_ci_fails_and_elsewhere_skips_with_the_reason(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no PostgreSQL server: initdb failed"):
        unavailable("no PostgreSQL server: initdb failed")
    for value in ("false", None):
        if value is None:
            monkeypatch.delenv("CI")
        else:
            monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="no PostgreSQL server: initdb failed"):
            unavailable("no PostgreSQL server: initdb failed")


def test_a_missing_server_program_is_named():
    with pytest.raises(ClusterUnavailable, match="no-such-pg-program is neither on PATH"):
        find_program("no-such-pg-program")


def test_the_server_is_private_to_this_machine_and_unlike_a_default_sqlite(postgres_cluster):
    import psycopg

    conninfo = f"host=127.0.0.1 port={postgres_cluster.port} user=postgres dbname=postgres"
    with psycopg.connect(conninfo, password=postgres_cluster.password) as connection:
        setting = lambda name: connection.execute(f"SHOW {name}").fetchone()[0]  # noqa: E731
        assert setting("listen_addresses") == "127.0.0.1"
        assert setting("server_version").startswith("15")
        assert setting("TimeZone") != "UTC"
        assert connection.execute("SELECT 'b' < 'B'").fetchone()[0]  # not byte order
        pid = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert Path(f"/proc/{pid}").stat().st_uid != 0  # while the backend is alive
    assert postgres_cluster.folder.stat().st_mode & 0o077 == 0
