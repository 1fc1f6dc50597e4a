"""A throwaway PostgreSQL server for one test session.

PostgreSQL refuses to run as root, so under root (as in CI) every server command
runs as the `postgres` user, in a temporary folder that user owns. The server
listens on 127.0.0.1 only, on a free port, behind a random password; it sorts
text by an ICU locale and keeps time in a zone other than UTC, as real servers
often do, so the store cannot lean on SQLite's byte order or on UTC sessions.

A watchdog process stops the server and deletes the folder once the test process
is gone, however it ends: closing the watchdog's stdin is the one way to stop.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from itertools import count
from pathlib import Path
from typing import NoReturn

import pytest

SERVER_USER = "postgres"
ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it
WATCHDOG = """
import shutil, subprocess, sys
sys.stdin.read()  # returns when the test process closes the pipe or ends
subprocess.run(sys.argv[1:-1], capture_output=True, timeout=60)
shutil.rmtree(sys.argv[-1], ignore_errors=True)
"""


class ClusterUnavailable(Exception):
    """No PostgreSQL server could be started here; the message says why."""


def unavailable(reason: str) -> NoReturn:
    """Without a server, fail under CI=true (CI must test PostgreSQL), else skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


class Cluster:
    """A running server; `create_database` hands out empty databases by URL."""

    def __init__(self, folder: Path, port: int, password: str, watchdog: subprocess.Popen):
        self.folder, self.port, self.password = folder, port, password
        self._watchdog = watchdog
        self._names = count(1)

    @classmethod
    def start(cls) -> Cluster:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ClusterUnavailable(
                "the psycopg driver is not installed (pip install '.[postgres]')"
            ) from None
        pg_ctl = find_program("pg_ctl")
        folder = Path(tempfile.mkdtemp(prefix="headscope-pg-"))
        data = folder / "data"
        watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG]
            + _as_server_user([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"])
            + [str(folder)],
            stdin=subprocess.PIPE,
            start_new_session=True,  # outlives a Ctrl-C aimed at the test run
        )
        try:
            password = secrets.token_hex(16)
            _initdb(folder, password)
            for _ in range(ATTEMPTS):
                port = _free_port()
                _configure(folder, port)
                started = _run([pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "start"])
                if started.returncode == 0:
                    return cls(folder, port, password, watchdog)
            log = folder / "log"
            said = log.read_text(errors="replace") if log.exists() else started.stderr
            last = " / ".join(said.strip().splitlines()[-3:])
            raise ClusterUnavailable(f"pg_ctl start failed {ATTEMPTS} times: {last}")
        except (OSError, subprocess.SubprocessError) as error:
            _stop(watchdog)
            raise ClusterUnavailable(str(error)) from None
        except BaseException:
            _stop(watchdog)
            raise

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> tuple[str, str]:
        """A new, empty database: (name, SQLAlchemy URL)."""
        name = f"headscope_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name}")
        return name, self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f"DROP DATABASE {name} WITH (FORCE)")  # ends leftover pooled connections

    def stop(self) -> None:
        _stop(self._watchdog)

    def restart(self) -> None:
        """Stop the server (dropping every connection) and start it again."""
        pg_ctl, data = find_program("pg_ctl"), str(self.folder / "data")
        done = _run(
            [pg_ctl, "-D", data, "-m", "fast", "-w", "restart", "-l", str(self.folder / "log")]
        )
        if done.returncode != 0:
            raise ClusterUnavailable(f"pg_ctl restart failed: {done.stderr.strip()}")

    def _admin(self, statement: str) -> None:
        import psycopg

        conninfo = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"
        with psycopg.connect(conninfo, password=self.password, autocommit=True) as connection:
            connection.execute(statement)


def _initdb(folder: Path, password: str) -> None:
    (folder / "password").write_text(password)
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise ClusterUnavailable(
                f"running as root and there is no {SERVER_USER!r} user"
            ) from None
        for path in (folder, folder / "password"):
            os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(folder / "password", 0o600)
    initdb = [find_program("initdb"), "-D", str(folder / "data"), "-U", "postgres"]
    initdb += ["-A", "scram-sha-256", f"--pwfile={folder / 'password'}", "-E", "UTF8"]
    initdb += ["--locale=C", "--locale-provider=icu", "--icu-locale=en-US"]
    made = _run([*initdb, "--no-sync", "--no-instructions"])
    if made.returncode != 0:
        raise ClusterUnavailable(f"initdb failed: {made.stderr.strip()}")


def _configure(folder: Path, port: int) -> None:
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": port,
        "unix_socket_directories": str(folder),
        "timezone": "Asia/Kolkata",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
    }
    # the last of repeated settings wins, so a retry's port replaces the one before
    with (folder / "data" / "postgresql.conf").open("a") as conf:
        conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())


def find_program(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    if not candidates:
        raise ClusterUnavailable(f"{name} is neither on PATH nor under /usr/lib/postgresql")
    return str(candidates[0])


def _as_server_user(argv: list[str]) -> list[str]:
    """PostgreSQL will not run as root: root hands its commands to the server user."""
    return ["runuser", "-u", SERVER_USER, "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        _as_server_user(argv), capture_output=True, text=True, timeout=60, cwd="/"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(watchdog: subprocess.Popen) -> None:
    watchdog.stdin.close()
    watchdog.wait(timeout=90)
