"""Tables of the findings store (SQLAlchemy 2.0 typed ORM).

Findings are plain rows a SQL user can query without decoding blobs:
per-head scores `(run_id, layer, head, metric, value)`, run metrics
`(run_id, name, value)`, and artifacts by file reference. Changes to these
tables go through a migration in `storage/migrations/versions`.

Types are chosen to behave as SQLite does on every database: text without a
length limit, 64-bit counts, and times read back in UTC (with the offset).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator):
    """A timestamp that always reads back as UTC: SQLite keeps no offset and returns
    naive datetimes, which would print without the UTC marker."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is not None:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value


class Base(DeclarativeBase):
    pass


class DatabaseIdentity(Base):
    """The one row about this database itself: its id, which names its artifact folder
    (so two databases never share artifact files, even when one is a copy of the
    other's file), and the last run id it gave (so a removed run's id is never reused)."""

    __tablename__ = "database_identity"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_run_id: Mapped[int] = mapped_column(Integer, default=0)


class ModelRecord(Base):
    """A model as it was when analysed (name plus weights revision)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    revision: Mapped[str] = mapped_column(Text)
    family: Mapped[str | None] = mapped_column(Text)
    layers: Mapped[int | None] = mapped_column(Integer)
    query_heads: Mapped[int | None] = mapped_column(Integer)
    kv_heads: Mapped[int | None] = mapped_column(Integer)
    head_dim: Mapped[int | None] = mapped_column(Integer)
    max_positions: Mapped[int | None] = mapped_column(Integer)
    parameters: Mapped[int | None] = mapped_column(BigInteger)
    source: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (Index("ix_models_name_revision", "name", "revision", unique=True),)


class Run(Base):
    """One execution of one analysis on one model."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis: Mapped[str] = mapped_column(Text, index=True)
    analysis_version: Mapped[str] = mapped_column(Text)
    plugin: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    model_name: Mapped[str] = mapped_column(Text, index=True)
    model_revision: Mapped[str | None] = mapped_column(Text)
    packages: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seed: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text, index=True)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    progress_done: Mapped[float | None] = mapped_column(Float)
    progress_total: Mapped[float | None] = mapped_column(Float)
    progress_message: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    owner_host: Mapped[str | None] = mapped_column(Text)
    owner_pid: Mapped[int | None] = mapped_column(Integer)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: the API token's name that submitted it (null: the command line, an open server)
    submitted_by: Mapped[str | None] = mapped_column(Text)
    #: its job in the database queue (null: run in the submitting process): such a
    #: run is recovered by the queue, never marked interrupted for its owner's death
    queue_job: Mapped[int | None] = mapped_column(BigInteger)

    model: Mapped[ModelRecord | None] = relationship()


class HeadScore(Base):
    """One number about one head in one run."""

    __tablename__ = "head_scores"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    metric: Mapped[str] = mapped_column(Text, primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    head: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_head_scores_metric_value", "metric", "value"),)


class RunMetric(Base):
    """One run-level number (accuracy, fraction of heads above a threshold...)."""

    __tablename__ = "run_metrics"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[float] = mapped_column(Float)


class ArtifactRecord(Base):
    """A file a run produced (plot, JSON table), stored by reference."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(Text)
    media_type: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ApiToken(Base):
    """A named bearer token for the JSON-RPC server, stored as its SHA-256 hash only
    (tokens are random, so a fast hash is enough; the token itself is shown once)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    token_hash: Mapped[str] = mapped_column(Text, unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
