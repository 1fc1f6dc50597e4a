"""Database location, engine and schema migrations.

Default: a SQLite file `headscope.db` in the user data directory, in WAL mode so
readers never block the writer and a killed writer leaves a readable file.
`--db URL` or `HEADSCOPE_DB` point elsewhere (e.g. postgresql+psycopg://...).
The schema is created and upgraded by Alembic migrations, never by hand.
Callers see the same values on every database (docs/storage.md, PostgreSQL).
"""

from __future__ import annotations

import json
import math
import os
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, make_url
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError, DatabaseError

from ..core.errors import HeadscopeError
from ..core.paths import data_dir

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x4E5C0DE  # PostgreSQL advisory lock key held while migrating


def database_url(url: str | None = None) -> str:
    """The URL in effect: explicit, then HEADSCOPE_DB, then the default file."""
    url = url or os.environ.get("HEADSCOPE_DB")
    if url:
        if "://" not in url:  # a bare path means a SQLite file
            url = f"sqlite:///{Path(url).expanduser().resolve()}"
        return url
    return f"sqlite:///{data_dir() / 'headscope.db'}"


def database_path(url: str) -> Path | None:
    """The file behind a SQLite URL (None for other databases)."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None


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
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    path = database_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        options: dict[str, Any] = {"pool_pre_ping": True}
        if make_url(url).get_backend_name() == "postgresql":
            options["json_serializer"] = _json_without_nan
        return create_engine(url, **options)
    except Exception as error:  # unknown dialect, missing driver
        raise HeadscopeError(f"cannot open database {display_url(url)!r}: {error}") from None


def _alembic_config(engine: Engine, connection=None):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    config = _alembic_config(make_engine("sqlite://"))
    return ScriptDirectory.from_config(config).get_current_head()


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
                command.upgrade(_alembic_config(engine, connection), "head")
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
