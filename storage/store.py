"""Reading and writing runs and findings.

A run's life: `create_run` writes it as queued (committed before any work starts),
`mark_running` and `update_progress` follow it, and `finish_run` writes every
finding plus the final status in one transaction, so a crash leaves either the
whole result or none of it, and never touches other runs. `delete_runs` removes
runs with every row they own, in one transaction, and then their artifact files.

Artifact files live beside the database in a folder of its own, named after the
file and the id stored in the database (`artifacts/<name>-<id>/run-N`), so two
databases in one folder, or a copy of one, never write over each other's files.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, cached_property
from pathlib import Path
from typing import Any

from sqlalchemy import Select, bindparam, case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from ..core.errors import HeadscopeError, RunAlreadyFinishedError, RunNotFoundError
from ..core.paths import data_dir
from ..core.runs import FINISHED, RunSummary
from .db import Mode, database_path, database_url, open_database, upgrade
from .schema import (
    ApiToken,
    ArtifactRecord,
    DatabaseIdentity,
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
        submitted_by=run.submitted_by,
    )


@dataclass
class Removal:
    """A removed run (or one a dry run would remove) and its artifact files."""

    run: RunSummary
    files: list[str] = field(default_factory=list)
    #: stored artifact paths outside this database's folder (another database's, or
    #: a folder older versions shared between databases): left in place
    kept: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run.as_dict(), "files": self.files, "kept_files": self.kept}


class Store:
    """The findings database behind one URL, opened for what the caller does (`mode`:
    create, write or read; see `storage.db`). `read_only` says whether it was opened
    read-only, which a read-only file is when only reading."""

    def __init__(self, url: str | None = None, migrate: bool = True, mode: Mode = "create"):
        self.url = database_url(url)
        self.engine, self.read_only = open_database(self.url, mode)
        if migrate and not self.read_only:
            upgrade(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def path(self) -> Path | None:
        return database_path(self.url)

    @cached_property
    def database_id(self) -> str:
        """The id created with the database and stored in it (a copied file keeps it)."""
        with self.session() as session:
            return session.scalars(select(DatabaseIdentity.id)).one()

    def artifacts_root(self) -> Path:
        """This database's artifact folder, beside its file and named after the file and
        `database_id`: a second database in the folder, or a copy, gets its own."""
        base, name = (self.path.parent, self.path.stem) if self.path else (data_dir(), "db")
        return (base / "artifacts" / f"{name}-{self.database_id[:12]}").resolve()

    def artifacts_dir(self, run_id: int) -> Path:
        path = self.artifacts_root() / f"run-{run_id}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def session(self) -> Session:
        return self._sessions()

    # -- models ----------------------------------------------------------------------
    def ensure_model(self, info: dict[str, Any]) -> int:
        """The id of the model's row, added if new."""
        try:
            return self._ensure_model(info)
        except IntegrityError:  # another process added the same model meanwhile
            return self._ensure_model(info)

    def _ensure_model(self, info: dict[str, Any]) -> int:
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
        submitted_by: str | None = None,
    ) -> int:
        with self.session() as session, session.begin():
            run = Run(
                id=_next_run_id(session),
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
                submitted_by=submitted_by,
            )
            session.add(run)
            session.flush()
            return run.id

    def set_queue_job(self, run_id: int, job_id: int) -> None:
        """Record the run's job in the database queue, which then recovers it."""
        with self.session() as session, session.begin():
            session.execute(update(Run).where(Run.id == run_id).values(queue_job=job_id))

    def queue_job(self, run_id: int) -> int | None:
        """The run's job in the database queue (None: it is run by its submitter)."""
        with self.session() as session:
            return session.scalar(select(Run.queue_job).where(Run.id == run_id))

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
        """Write all findings and mark the run succeeded, in one transaction.

        A NaN finding is refused before anything is written, on every database
        (SQLite cannot store NaN; PostgreSQL would rank it above every number).
        """
        score_rows = [
            {"run_id": run_id, "layer": int(l), "head": int(h), "metric": m, "value": float(v)}
            for l, h, m, v in head_scores  # noqa: E741
        ]
        metric_rows = [{"run_id": run_id, "name": k, "value": float(v)} for k, v in metrics.items()]
        for row in (*score_rows, *metric_rows):
            if math.isnan(row["value"]):
                raise ValueError(f"a finding is NaN, not a number: {row}")
        with self.session() as session, session.begin():
            run = session.get(Run, run_id, with_for_update=True)
            if run is None:
                raise RunNotFoundError(f"no run with id {run_id}")
            if run.status in FINISHED:  # another attempt finished it: never store twice
                raise RunAlreadyFinishedError(
                    f"run {run_id} is already {run.status}; its findings are not written again"
                )
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

    def fail_run(
        self, run_id: int, error: str, status: str = "failed", only_unfinished: bool = False
    ) -> None:
        """Record why a run ended without results. With `only_unfinished`, a run that
        has ended already (say another attempt at it succeeded) is left as it is."""
        with self.session() as session, session.begin():
            run = session.get(Run, run_id, with_for_update=True)
            if run is None or (only_unfinished and run.status in FINISHED):
                return
            finished = utcnow()
            run.status = status
            run.error = error
            run.finished_at = finished
            run.duration_seconds = _elapsed(run.started_at or run.created_at, finished)

    def mark_interrupted(self, only_dead_owners: bool = True) -> list[int]:
        """Mark runs left queued/running by a process that no longer exists.

        With `only_dead_owners=False` every unfinished run is marked (a service that
        owns all runs calls this at start-up). Runs in the database queue are left to
        it: a job whose worker died is retried there.
        """
        host = socket.gethostname()
        marked = []
        with self.session() as session, session.begin():
            stale = session.scalars(
                select(Run).where(Run.status.in_(("queued", "running")), Run.queue_job.is_(None))
            )
            for run in stale:
                if only_dead_owners and not _owner_dead(run, host):
                    continue
                run.status = "interrupted"
                run.error = "the process running it stopped before it finished"
                run.finished_at = utcnow()
                marked.append(run.id)
        return marked

    # -- API tokens ----------------------------------------------------------------------
    def create_token(self, name: str, token_hash: str, scopes: Sequence[str]) -> None:
        with self.session() as session, session.begin():
            taken = session.scalar(select(ApiToken.id).where(ApiToken.name == name))
            if taken is not None:
                raise HeadscopeError(
                    f"a token named {name!r} exists; revoke it or pick another name"
                )
            session.add(ApiToken(name=name, token_hash=token_hash, scopes=list(scopes)))

    def tokens(self) -> list[dict[str, Any]]:
        """Every token, revoked ones too (without hashes), oldest first."""
        with self.session() as session:
            rows = session.scalars(select(ApiToken).order_by(ApiToken.id))
            return [
                {
                    "name": t.name,
                    "scopes": t.scopes,
                    "created_at": t.created_at,
                    "revoked_at": t.revoked_at,
                }
                for t in rows
            ]

    def revoke_token(self, name: str) -> None:
        with self.session() as session, session.begin():
            token = session.scalar(select(ApiToken).where(ApiToken.name == name))
            if token is None:
                raise HeadscopeError(f"no token named {name!r}")
            if token.revoked_at is None:
                token.revoked_at = utcnow()

    def token_by_hash(self, token_hash: str) -> tuple[str, list[str]] | None:
        """(name, scopes) of the live token with this hash; None if none or revoked."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(ApiToken.name, ApiToken.scopes).where(
                    ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None)
                )
            ).first()
        return None if row is None else (row.name, list(row.scopes))

    def has_tokens(self) -> bool:
        with self.session() as session:
            query = select(ApiToken.id).where(ApiToken.revoked_at.is_(None)).limit(1)
            return session.scalar(query) is not None

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
        """Rows by metric, layer, head; names sorted here, by code point, because the
        database's collation (PostgreSQL's locale) would order them differently."""
        if not _storable(run_id):
            return []
        query = select(HeadScore).where(HeadScore.run_id == run_id)
        if metric:
            query = query.where(HeadScore.metric == metric)
        with self.session() as session:
            scores = sorted(session.scalars(query), key=lambda s: (s.metric, s.layer, s.head))
            return [
                {"layer": s.layer, "head": s.head, "metric": s.metric, "value": s.value}
                for s in scores
            ]

    def head_metrics(self, run_id: int) -> list[str]:
        if not _storable(run_id):
            return []
        with self.session() as session:
            query = select(HeadScore.metric).where(HeadScore.run_id == run_id).distinct()
            return sorted(session.scalars(query))

    def metrics(self, run_id: int) -> dict[str, float]:
        """By name, sorted by code point as head_scores are."""
        if not _storable(run_id):
            return {}
        with self.session() as session:
            rows = session.scalars(select(RunMetric).where(RunMetric.run_id == run_id))
            return {r.name: r.value for r in sorted(rows, key=lambda r: r.name)}

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

    def head_rank(self, run_id: int, metric: str, layer: int, head: int) -> tuple[int, int] | None:
        """Where one head stands in a run by a metric: (its rank, 1 for the highest
        score, ties sharing the better rank; how many heads have that metric). None
        when the head has no number for it."""
        if not all(_storable(n) for n in (run_id, layer, head)):
            return None
        scores = select(HeadScore.value).where(
            HeadScore.run_id == run_id, HeadScore.metric == metric
        )
        with self.engine.connect() as connection:
            value = connection.scalar(
                scores.where(HeadScore.layer == layer, HeadScore.head == head)
            )
            if value is None:
                return None
            above = connection.scalar(
                select(func.count()).select_from(scores.where(HeadScore.value > value).subquery())
            )
            total = connection.scalar(
                select(func.count()).select_from(
                    scores.where(HeadScore.value.is_not(None)).subquery()
                )
            )
        return above + 1, total

    # -- removing ------------------------------------------------------------------------
    def run_ids(
        self,
        analysis: str | None = None,
        model: str | None = None,
        statuses: Sequence[str] = (),
        created_before: datetime | None = None,
    ) -> list[int]:
        """Every run matching all the filters given, oldest first (what to prune)."""
        query = _filtered(select(Run.id), analysis, model, None)
        if statuses:
            query = query.where(Run.status.in_(statuses))
        if created_before is not None:
            query = query.where(Run.created_at < created_before)
        with self.session() as session:
            return list(session.scalars(query.order_by(Run.id)))

    def delete_runs(
        self, run_ids: Sequence[int], force: bool = False, dry_run: bool = False
    ) -> list[Removal]:
        """Remove runs: their rows (head scores, metrics, artifact records, the run) in
        one transaction, then their files in this database's artifact folder.

        All or nothing: an unknown id, or a queued or running run without `force`,
        removes none. `dry_run` reports the same and removes nothing.
        """
        ids = list(dict.fromkeys(run_ids))
        if not ids:
            return []
        with self.session() as session, session.begin():
            runs = {run.id: run for run in session.scalars(select(Run).where(Run.id.in_(ids)))}
            missing = [str(run_id) for run_id in ids if run_id not in runs]
            if missing:
                raise RunNotFoundError(f"no run with id {', '.join(missing)}")
            active = [runs[run_id] for run_id in ids if runs[run_id].status not in FINISHED]
            if active and not force:
                run = active[0]
                raise HeadscopeError(
                    f"run {run.id} is {run.status}; cancel it first, or force its removal"
                )
            stored = session.execute(
                select(ArtifactRecord.run_id, ArtifactRecord.path)
                .where(ArtifactRecord.run_id.in_(ids))
                .order_by(ArtifactRecord.id)
            ).all()
            removals = {run_id: Removal(_summary(runs[run_id])) for run_id in ids}
            if not dry_run:
                for table in (HeadScore, RunMetric, ArtifactRecord):
                    session.execute(delete(table).where(table.run_id.in_(ids)))
                session.execute(delete(Run).where(Run.id.in_(ids)))
        root = self.artifacts_root()
        for run_id, path in stored:
            inside = Path(path).resolve().is_relative_to(root)
            (removals[run_id].files if inside else removals[run_id].kept).append(path)
        for run_id, removal in removals.items():
            folder = root / f"run-{run_id}"
            if folder.is_dir():  # with what the run wrote there without recording it
                written = {str(path) for path in folder.rglob("*") if path.is_file()}
                removal.files += sorted(written - set(removal.files))
            if not dry_run:
                for path in removal.files:
                    Path(path).unlink(missing_ok=True)
                shutil.rmtree(folder, ignore_errors=True)
        return list(removals.values())


def _next_run_id(session: Session) -> int:
    """A run id never given before, even to a removed run (SQLite would reuse the
    highest): the counter in `database_identity`, moved on in the same statement that
    takes the write lock, so concurrent writers never draw the same id."""
    highest = select(func.coalesce(func.max(Run.id), 0)).scalar_subquery()
    last = DatabaseIdentity.last_run_id
    bumped = update(DatabaseIdentity).values(
        last_run_id=case((last >= highest, last), else_=highest) + 1
    )
    return session.scalar(bumped.returning(DatabaseIdentity.last_run_id))


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
    return None if start is None else (end - start).total_seconds()


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
