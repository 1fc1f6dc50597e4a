"""Database location, engine and schema migrations.

Default: a SQLite file `headscope.db` in the user data directory, in WAL mode so
readers never block the writer and a killed writer leaves a readable file.
`--db URL` or `HEADSCOPE_DB` point elsewhere (e.g. postgresql+psycopg://...).
The schema is created and upgraded by Alembic migrations, never by hand.
Callers see the same values on every database (docs/storage.md, PostgreSQL).

A database is opened for what the command does (`Mode`), and refused before
anything is written when it is not headscope's, is missing (unless the command
creates it) or is read-only (unless the command only reads).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from sqlalchemy import create_engine, event, inspect, make_url
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError, DatabaseError
from sqlalchemy.pool import NullPool

from ..core.errors import HeadscopeError
from ..core.paths import data_dir
from .schema import Base

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x4E5C0DE  # PostgreSQL advisory lock key held while migrating

#: create: made when missing (run, serve, db upgrade); it must be writable.
#: write: it must exist and be writable (cancelling, deleting runs).
#: read: it must exist; a read-only one is opened read-only.
Mode = Literal["create", "write", "read"]

#: every table a headscope database holds; a database with others is someone else's
HEADSCOPE_TABLES = frozenset(Base.metadata.tables) | {"alembic_version"}


def database_url(url: str | None = None) -> str:
    """The URL in effect: explicit, then HEADSCOPE_DB, then the default file."""
    url = url or os.environ.get("HEADSCOPE_DB")
    if url:
        if "://" not in url:  # a bare path means a SQLite file
            url = f"sqlite:///{Path(url).expanduser().resolve()}"
        return url
    return f"sqlite:///{data_dir() / 'headscope.db'}"


def database_path(url: str) -> Path | None:
    """The file behind a SQLite URL, made absolute (None for other databases and
    for in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).absolute()


def open_database(url: str, mode: Mode = "create") -> tuple[Engine, bool]:
    """An engine on the database at `url`; returns (engine, read_only).

    A missing SQLite file is an error unless `mode` is create (a mistyped path must
    not look like an empty store); so is a read-only one unless `mode` is read.
    """
    path = database_path(url)
    if path is None:
        engine, read_only, where = _server_engine(url), False, display_url(url)
    else:
        read_only, where = _sqlite_access(path, mode), str(path)
        engine = _sqlite_engine(url, path, read_only)
    try:
        _check_headscope(engine, where, mode)
        if path is not None and not read_only:
            with engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    except DatabaseError as error:
        engine.dispose()
        raise HeadscopeError(f"cannot open database {where}: {error.orig}") from None
    except HeadscopeError:
        engine.dispose()
        raise
    return engine, read_only


def _sqlite_access(path: Path, mode: Mode) -> bool:
    """Whether the file must be opened read-only; raises where `mode` forbids it."""
    if not path.exists():
        if mode != "create":
            raise HeadscopeError(f"no database at {path}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise HeadscopeError(f"cannot create database {path}: {error.strerror}") from None
        if not os.access(path.parent, os.W_OK):
            raise HeadscopeError(f"cannot create database {path}: its folder is read-only")
        return False
    # SQLite writes the file and, in WAL mode, two files beside it
    read_only = not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))
    if read_only and mode != "read":
        raise HeadscopeError(f"database {path} is read-only")
    return read_only


def _sqlite_engine(url: str, path: Path, read_only: bool) -> Engine:
    if not read_only:
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # on a read-only folder SQLite cannot create the WAL index beside the file;
    # immutable tells it that nobody writes there, so it needs none
    options = "mode=ro" if os.access(path.parent, os.W_OK) else "mode=ro&immutable=1"
    uri = f"file:{quote(str(path))}?{options}"
    return create_engine(
        "sqlite://",
        creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10),
        poolclass=NullPool,
    )


def display_url(url: str | URL) -> str:
    """The URL as messages show it: a password is masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


def _json_without_nan(value: Any) -> str:
    """JSON for PostgreSQL, whose json type refuses NaN and infinities: they become
    null (as in RPC results); SQLite stores the text Python writes."""
    return json.dumps(_finite(value))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _server_engine(url: str) -> Engine:
    try:
        options: dict[str, Any] = {"pool_pre_ping": True}
        if make_url(url).get_backend_name() == "postgresql":
            options["json_serializer"] = _json_without_nan
        return create_engine(url, **options)
    except Exception as error:  # unknown dialect, missing driver
        raise HeadscopeError(f"cannot open database {display_url(url)!r}: {error}") from None


def _check_headscope(engine: Engine, where: str, mode: Mode) -> None:
    """Refuse a database that holds other tables, or a schema this version does not know."""
    tables = set(inspect(engine).get_table_names())
    foreign = sorted(tables - HEADSCOPE_TABLES)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise HeadscopeError(
            f"{where} is not a headscope database (it has tables {', '.join(foreign[:3])}"
            f"{more}); refusing to use it"
        )
    if not tables and mode != "create":
        raise HeadscopeError(f"no database at {where} (the file is empty)")
    revision = current_revision(engine) if "alembic_version" in tables else None
    if revision is not None and revision not in _known_revisions():
        raise HeadscopeError(
            f"{where} has schema revision {revision!r}, which this headscope version does "
            "not know (was it written by a newer one?)"
        )


def _alembic_config(url: str, connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["connection"] = connection
    return config


def _scripts():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config("sqlite://"))


def head_revision() -> str:
    return _scripts().get_current_head()


@cache
def _known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in _scripts().walk_revisions())


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the latest migration; returns (before, after).

    The migration runs in one transaction that holds the database's schema lock,
    so processes opening a new database at once migrate it exactly once.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    try:
        before = current_revision(engine)
        if before == _cached_head():
            return before, before
        with engine.begin() as connection:
            _lock_schema(connection)
            before = MigrationContext.configure(connection).get_current_revision()
            if before != _cached_head():
                if before is None and "runs" in inspect(connection).get_table_names():
                    raise HeadscopeError(
                        "the database has headscope tables but no migration record;"
                        " refusing to modify it"
                    )
                url = engine.url.render_as_string(hide_password=False)
                command.upgrade(_alembic_config(url, connection), "head")
        return before, current_revision(engine)
    except DatabaseError as error:
        raise HeadscopeError(
            f"cannot open database {display_url(engine.url)}: {error.orig}"
        ) from None


def _lock_schema(connection: Connection) -> None:
    """Wait for any other process migrating this database (released at commit)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    elif connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")


@cache
def _cached_head() -> str:
    return head_revision()
