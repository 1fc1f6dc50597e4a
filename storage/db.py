"""Database location, engine and schema migrations.

Default: a SQLite file `headscope.db` in the user data directory, in WAL mode so
readers never block the writer and a killed writer leaves a readable file.
`--db URL` or `HEADSCOPE_DB` point elsewhere (e.g. postgresql+psycopg://...).
The schema is created and upgraded by Alembic migrations, never by hand.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine

from ..core.errors import HeadscopeError
from ..core.paths import data_dir

MIGRATIONS = Path(__file__).parent / "migrations"


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
        return create_engine(url, pool_pre_ping=True)
    except Exception as error:  # unknown dialect, missing driver
        raise HeadscopeError(f"cannot open database {url!r}: {error}") from None


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
    """Bring the schema to the latest migration; returns (before, after)."""
    from alembic import command

    before = current_revision(engine)
    if before == _cached_head():
        return before, before
    tables = set(inspect(engine).get_table_names())
    if before is None and tables and "runs" in tables:
        raise HeadscopeError(
            "the database has headscope tables but no migration record; refusing to modify it"
        )
    with engine.begin() as connection:
        command.upgrade(_alembic_config(engine, connection), "head")
    return before, current_revision(engine)


@cache
def _cached_head() -> str:
    return head_revision()
