"""The command line on a PostgreSQL store (the throwaway server of the test session)."""

from __future__ import annotations

from headscope.storage.db import head_revision

from helpers.cli import run_cli


def test_db_upgrade_and_runs_list_on_postgresql(capsys, postgres_url):
    upgraded = run_cli(capsys, "db", "upgrade", "-f", "json", "--db", postgres_url).json()
    assert upgraded == {"before": None, "after": head_revision()}
    again = run_cli(capsys, "db", "upgrade", "-f", "json", "--db", postgres_url).json()
    assert again == {"before": head_revision(), "after": head_revision()}
    listed = run_cli(capsys, "runs", "list", "-f", "json", "--db", postgres_url).json()
    assert listed == {"total": 0, "runs": []}


def test_a_refused_postgresql_connection_is_one_line_without_the_password(capsys, postgres_cluster):
    url = postgres_cluster.url("postgres").replace(postgres_cluster.password, "not-the-password")
    for args in (["db", "upgrade"], ["runs", "list"]):
        result = run_cli(capsys, *args, "--db", url)
        assert result.code == 1, args
        assert len(result.err.strip().splitlines()) == 1, result.err
        assert "cannot open database" in result.err and "not-the-password" not in result.err
