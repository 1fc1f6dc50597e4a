"""Reading and writing runs and findings.

A run's life: `create_run` writes it as queued (committed before any work starts),
`mark_running` and `update_progress` follow it, and `finish_run` writes every
finding plus the final status in one transaction, so a crash leaves either the
whole result or none of it, and never touches other runs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Select, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from ..core.errors import HeadscopeError, RunNotFoundError
from ..core.paths import data_dir
from ..core.runs import FINISHED, RunSummary
from .db import database_path, database_url, make_engine, upgrade
from .schema import (
    ArtifactRecord,
    HeadScore,
    ModelRecord,
    Run,
    RunMetric,
    utcnow,
)

#: SQL integers are 64-bit: a larger run id (say from a typo) names no run, and a
#: larger offset skips every row
_MAX_ID = 2**63 - 1


def _storable(number: int) -> bool:
    return -_MAX_ID - 1 <= number <= _MAX_ID


def _summary(run: Run) -> RunSummary:
    return RunSummary(
        id=run.id,
        analysis=run.analysis,
        analysis_version=run.analysis_version,
        plugin=run.plugin,
        model=run.model_name,
        model_revision=run.model_revision,
        params=run.params,
        seed=run.seed,
        status=run.status,
        error=run.error,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        duration_seconds=run.duration_seconds,
        progress_done=run.progress_done,
        progress_total=run.progress_total,
        progress_message=run.progress_message,
        packages=run.packages or {},
        summary=run.summary,
    )


class Store:
    """The findings database behind one URL."""

    def __init__(self, url: str | None = None, migrate: bool = True):
        self.url = database_url(url)
        self.engine = make_engine(self.url)
        if migrate:
            try:
                upgrade(self.engine)
            except DatabaseError as error:
                raise HeadscopeError(f"cannot open database {self.url}: {error.orig}") from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def path(self) -> Path | None:
        return database_path(self.url)

    def artifacts_dir(self, run_id: int) -> Path:
        base = self.path.parent if self.path is not None else data_dir()
        path = base / "artifacts" / f"run-{run_id}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def session(self) -> Session:
        return self._sessions()

    # -- models ----------------------------------------------------------------------
    def ensure_model(self, info: dict[str, Any]) -> int:
        with self.session() as session, session.begin():
            existing = session.scalar(
                select(ModelRecord).where(
                    ModelRecord.name == info["name"], ModelRecord.revision == info["revision"]
                )
            )
            if existing is not None:
                return existing.id
            record = ModelRecord(
                name=info["name"],
                revision=info["revision"],
                family=info.get("family"),
                layers=info.get("layers"),
                query_heads=info.get("query_heads"),
                kv_heads=info.get("kv_heads"),
                head_dim=info.get("head_dim"),
                max_positions=info.get("max_positions"),
                parameters=info.get("parameters"),
                source=info.get("source"),
            )
            session.add(record)
            session.flush()
            return record.id

    def models(self) -> list[dict[str, Any]]:
        with self.session() as session:
            rows = session.scalars(select(ModelRecord).order_by(ModelRecord.id)).all()
            return [
                {c.name: getattr(r, c.name) for c in ModelRecord.__table__.columns} for r in rows
            ]

    # -- run lifecycle -----------------------------------------------------------------
    def create_run(
        self,
        analysis: str,
        analysis_version: str,
        model_name: str,
        params: dict[str, Any],
        seed: int,
        plugin: str | None = None,
        packages: dict[str, Any] | None = None,
    ) -> int:
        with self.session() as session, session.begin():
            run = Run(
                analysis=analysis,
                analysis_version=analysis_version,
                plugin=plugin,
                params=params,
                model_name=model_name,
                packages=packages or {},
                seed=seed,
                status="queued",
                cancel_requested=False,
                owner_host=socket.gethostname(),
                owner_pid=os.getpid(),
            )
            session.add(run)
            session.flush()
            return run.id

    def mark_running(self, run_id: int, model_id: int | None, model_revision: str | None) -> None:
        with self.session() as session, session.begin():
            session.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(
                    status="running",
                    started_at=utcnow(),
                    model_id=model_id,
                    model_revision=model_revision,
                    owner_host=socket.gethostname(),
                    owner_pid=os.getpid(),
                )
            )

    def update_progress(self, run_id: int, done: float, total: float | None, message: str) -> bool:
        """Record progress; returns True when a cancel was requested."""
        with self.session() as session, session.begin():
            session.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(progress_done=done, progress_total=total, progress_message=message[:500])
            )
            return bool(session.scalar(select(Run.cancel_requested).where(Run.id == run_id)))

    def cancel_requested(self, run_id: int) -> bool:
        with self.session() as session:
            return bool(session.scalar(select(Run.cancel_requested).where(Run.id == run_id)))

    def request_cancel(self, run_id: int) -> str:
        """Ask a run to stop; queued runs are cancelled at once. Returns the status."""
        with self.session() as session, session.begin():
            run = session.get(Run, run_id) if _storable(run_id) else None
            if run is None:
                raise RunNotFoundError(f"no run with id {run_id}")
            if run.status in FINISHED:
                return run.status
            run.cancel_requested = True
            if run.status == "queued":
                run.status = "cancelled"
                run.finished_at = utcnow()
                run.error = "cancelled before it started"
            return run.status

    def finish_run(
        self,
        run_id: int,
        head_scores: Iterable[tuple[int, int, str, float]],
        metrics: dict[str, float],
        artifacts: Sequence[dict[str, Any]] = (),
        summary: dict[str, Any] | None = None,
    ) -> None:
        """Write all findings and mark the run succeeded, in one transaction."""
        score_rows = [
            {"run_id": run_id, "layer": int(l), "head": int(h), "metric": m, "value": float(v)}
            for l, h, m, v in head_scores  # noqa: E741
        ]
        metric_rows = [{"run_id": run_id, "name": k, "value": float(v)} for k, v in metrics.items()]
        with self.session() as session, session.begin():
            run = session.get(Run, run_id)
            if run is None:
                raise RunNotFoundError(f"no run with id {run_id}")
            if score_rows:
                session.execute(insert(HeadScore), score_rows)
            if metric_rows:
                session.execute(insert(RunMetric), metric_rows)
            for artifact in artifacts:
                session.add(ArtifactRecord(run_id=run_id, **artifact))
            finished = utcnow()
            run.status = "succeeded"
            run.finished_at = finished
            run.summary = summary
            run.duration_seconds = _elapsed(run.started_at or run.created_at, finished)

    def fail_run(self, run_id: int, error: str, status: str = "failed") -> None:
        with self.session() as session, session.begin():
            run = session.get(Run, run_id)
            if run is None:
                return
            finished = utcnow()
            run.status = status
            run.error = error
            run.finished_at = finished
            run.duration_seconds = _elapsed(run.started_at or run.created_at, finished)

    def mark_interrupted(self, only_dead_owners: bool = True) -> list[int]:
        """Mark runs left queued/running by a process that no longer exists.

        With `only_dead_owners=False` every unfinished run is marked (a service that
        owns all runs calls this at start-up).
        """
        host = socket.gethostname()
        marked = []
        with self.session() as session, session.begin():
            stale = session.scalars(select(Run).where(Run.status.in_(("queued", "running"))))
            for run in stale:
                if only_dead_owners and not _owner_dead(run, host):
                    continue
                run.status = "interrupted"
                run.error = "the process running it stopped before it finished"
                run.finished_at = utcnow()
                marked.append(run.id)
        return marked

    # -- reading -------------------------------------------------------------------------
    def get_run(self, run_id: int) -> RunSummary:
        with self.session() as session:
            run = session.get(Run, run_id) if _storable(run_id) else None
            if run is None:
                raise RunNotFoundError(f"no run with id {run_id}")
            return _summary(run)

    def list_runs(
        self,
        analysis: str | None = None,
        model: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[RunSummary]:
        if not _storable(offset):
            return []
        query = _filtered(select(Run), analysis, model, status)
        query = query.order_by(Run.id.desc()).limit(min(limit, _MAX_ID)).offset(offset)
        with self.session() as session:
            return [_summary(r) for r in session.scalars(query)]

    def count_runs(
        self, analysis: str | None = None, model: str | None = None, status: str | None = None
    ) -> int:
        query = _filtered(select(func.count(Run.id)), analysis, model, status)
        with self.session() as session:
            return int(session.scalar(query) or 0)

    def head_scores(self, run_id: int, metric: str | None = None) -> list[dict[str, Any]]:
        if not _storable(run_id):
            return []
        query = (
            select(HeadScore)
            .where(HeadScore.run_id == run_id)
            .order_by(HeadScore.metric, HeadScore.layer, HeadScore.head)
        )
        if metric:
            query = query.where(HeadScore.metric == metric)
        with self.session() as session:
            return [
                {"layer": s.layer, "head": s.head, "metric": s.metric, "value": s.value}
                for s in session.scalars(query)
            ]

    def head_metrics(self, run_id: int) -> list[str]:
        if not _storable(run_id):
            return []
        with self.session() as session:
            query = select(HeadScore.metric).where(HeadScore.run_id == run_id).distinct()
            return sorted(session.scalars(query))

    def metrics(self, run_id: int) -> dict[str, float]:
        if not _storable(run_id):
            return {}
        with self.session() as session:
            rows = session.scalars(
                select(RunMetric).where(RunMetric.run_id == run_id).order_by(RunMetric.name)
            )
            return {r.name: r.value for r in rows}

    def artifacts(self, run_id: int) -> list[dict[str, Any]]:
        with self.session() as session:
            rows = session.scalars(
                select(ArtifactRecord)
                .where(ArtifactRecord.run_id == run_id)
                .order_by(ArtifactRecord.id)
            )
            return [
                {
                    "name": a.name,
                    "media_type": a.media_type,
                    "path": a.path,
                    "size": a.size,
                    "description": a.description,
                }
                for a in rows
            ]

    def top_heads(
        self,
        metric: str,
        run_id: int | None = None,
        model: str | None = None,
        analysis: str | None = None,
        limit: int = 20,
        offset: int = 0,
        min_value: float | None = None,
        descending: bool = True,
    ) -> list[dict[str, Any]]:
        """Heads ranked by a metric, across runs filtered by run, model or analysis.

        Served often (findings.query), so the statement is built once per filter
        combination and rows are read as plain tuples rather than ORM objects.
        """
        if not (_storable(offset) and (run_id is None or _storable(run_id))):
            return []
        statement = _top_heads_statement(
            run_id is not None, bool(model), bool(analysis), min_value is not None, descending
        )
        values = {
            "metric": metric,
            "run_id": run_id,
            "model": model,
            "analysis": analysis,
            "min_value": min_value,
            "limit": min(limit, _MAX_ID),
            "offset": offset,
        }
        with self.engine.connect() as connection:
            return [row._asdict() for row in connection.execute(statement, values)]

    def head_across_runs(
        self, layer: int, head: int, model: str | None = None, analysis: str | None = None
    ) -> list[dict[str, Any]]:
        """Every score of one head in succeeded runs, newest run first, then by metric."""
        if not (_storable(layer) and _storable(head)):
            return []
        query = _filtered(
            select(
                HeadScore.run_id,
                Run.model_name.label("model"),
                Run.analysis,
                HeadScore.metric,
                HeadScore.value,
            )
            .join(Run, Run.id == HeadScore.run_id)
            .where(HeadScore.layer == layer, HeadScore.head == head),
            analysis,
            model,
            "succeeded",
        )
        query = query.order_by(HeadScore.run_id.desc(), HeadScore.metric)
        with self.engine.connect() as connection:
            return [row._asdict() for row in connection.execute(query)]

    def delete_run(self, run_id: int) -> None:
        with self.session() as session, session.begin():
            session.execute(delete(Run).where(Run.id == run_id))


def _filtered(query, analysis: str | None, model: str | None, status: str | None):
    if analysis:
        query = query.where(Run.analysis == analysis)
    if model:
        query = query.where(Run.model_name == model)
    if status:
        query = query.where(Run.status == status)
    return query


@cache
def _top_heads_statement(
    by_run: bool, by_model: bool, by_analysis: bool, by_min: bool, descending: bool
) -> Select:
    query = (
        select(
            HeadScore.run_id,
            Run.model_name.label("model"),
            Run.analysis,
            HeadScore.layer,
            HeadScore.head,
            HeadScore.metric,
            HeadScore.value,
        )
        .join(Run, Run.id == HeadScore.run_id)
        .where(HeadScore.metric == bindparam("metric"), Run.status == "succeeded")
    )
    if by_run:
        query = query.where(HeadScore.run_id == bindparam("run_id"))
    if by_model:
        query = query.where(Run.model_name == bindparam("model"))
    if by_analysis:
        query = query.where(Run.analysis == bindparam("analysis"))
    if by_min:
        query = query.where(HeadScore.value >= bindparam("min_value"))
    order = HeadScore.value.desc() if descending else HeadScore.value.asc()
    query = query.order_by(order, HeadScore.run_id, HeadScore.layer, HeadScore.head)
    return query.limit(bindparam("limit")).offset(bindparam("offset"))


def _elapsed(start: datetime | None, end: datetime) -> float | None:
    if start is None:
        return None
    if start.tzinfo is None:  # SQLite returns naive datetimes
        end = end.replace(tzinfo=None)
    return (end - start).total_seconds()


def _owner_dead(run: Run, host: str) -> bool:
    if run.owner_host != host or run.owner_pid is None:
        return False
    if run.owner_pid == os.getpid():
        return False
    try:
        os.kill(run.owner_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
