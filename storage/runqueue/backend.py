"""The queue: procrastinate jobs in the `headscope_queue` schema of the findings database.

A run is recorded in the store as today, then deferred as one job carrying only its
id, on the queue of its model (`model:NAME`), so a worker takes only runs for the
models it serves. procrastinate takes jobs with `FOR UPDATE SKIP LOCKED` (no job is
taken twice), records worker heartbeats (a worker killed mid-job is seen as
stalled) and cancels jobs that wait. Its tables live in their own schema so the
findings tables stay as they are, and the schema is installed on first use under
an advisory lock (several processes may start at once).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import make_url

from ...core import jobs
from ...core.analysis import FindingsReader
from ...core.errors import HeadscopeError, InvalidParamsError
from ...core.workers import QueueFullError

log = logging.getLogger("headscope.queue")

SCHEMA = "headscope_queue"
TASK_NAME = "headscope.run"
#: attempts at a run whose worker died, before it is failed with the reason
DEFAULT_MAX_ATTEMPTS = 3
_SCHEMA_LOCK = 0x6865_6164  # advisory lock id: one process installs the schema


class QueueUnavailableError(HeadscopeError):
    """The queue needs PostgreSQL and procrastinate."""


def is_queue_url(url: str) -> bool:
    """True for a PostgreSQL URL: runs then go through the queue."""
    return make_url(url).get_backend_name() == "postgresql"


def connection_info(url: str) -> str:
    """The libpq connection string for a SQLAlchemy URL, in the queue's schema."""
    try:
        from psycopg.conninfo import make_conninfo
    except ImportError:
        raise QueueUnavailableError(
            "the run queue needs the postgres extra: pip install 'headscope[postgres]'"
        ) from None
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise QueueUnavailableError(
            "the run queue needs a PostgreSQL database (--db postgresql+psycopg://...); "
            "with SQLite, runs are taken by `headscope serve` itself"
        )
    given = {
        "host": parsed.host,
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password,
        "dbname": parsed.database,
        **{key: str(value) for key, value in parsed.query.items()},
    }
    options = {key: value for key, value in given.items() if value is not None}
    return make_conninfo(**options, options=f"-c search_path={SCHEMA}")


def queue_for(model_name: str) -> str:
    return f"model:{model_name}"


def ensure_schema(conninfo: str) -> None:
    """Install procrastinate's tables in the queue's schema, once."""
    import psycopg
    from procrastinate.schema import SchemaManager

    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
        try:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            found = connection.execute(
                "SELECT to_regclass(%s)", (f"{SCHEMA}.procrastinate_jobs",)
            ).fetchone()
            if found[0] is None:
                log.info("installing the run queue in schema %s", SCHEMA)
                connection.execute(SchemaManager.get_schema())
        finally:
            connection.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))


def sync_app(url: str):
    """An open procrastinate app for deferring and cancelling from plain threads."""
    from procrastinate import App, SyncPsycopgConnector

    conninfo = connection_info(url)
    ensure_schema(conninfo)
    return App(connector=SyncPsycopgConnector(conninfo=conninfo, min_size=1, max_size=4)).open()


def enqueue(app: Any, store: Any, run_id: int, model_name: str) -> None:
    """Defer the recorded run; if that fails the run is failed, never left waiting."""
    try:
        job_id = app.configure_task(
            TASK_NAME, queue=queue_for(model_name), lock=f"run-{run_id}"
        ).defer(run_id=run_id)
    except Exception as error:
        store.fail_run(run_id, f"could not be queued: {error}")
        raise HeadscopeError(f"run {run_id} could not be queued: {error}") from None
    store.set_queue_job(run_id, job_id)


class QueuedRuns:
    """What a front end does with runs when workers take them: record and enqueue,
    cancel (reaching whichever worker runs it, through the store), and load models
    only if the front end runs a worker itself (`pool`)."""

    def __init__(
        self, store: Any, registry: Any, max_queued: int, pool: Any = None, app: Any = None
    ):
        self.store, self.registry, self.max_queued, self.pool = store, registry, max_queued, pool
        self.app = app or sync_app(store.url)
        self._worker: tuple[threading.Thread, threading.Event] | None = None

    def start_worker(self, worker: Any) -> None:
        """Also take runs here, with a `worker.QueueWorker` in a thread of its own."""
        stop = threading.Event()
        thread = threading.Thread(target=worker.serve, args=(stop,), name="queue-worker")
        thread.daemon = True
        thread.start()
        self._worker = (thread, stop)

    def submit(
        self,
        analysis: str,
        model: str,
        params: dict | None,
        seed: int = 0,
        submitted_by: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        device_map: str | None = None,
        max_memory: str | int | None = None,
    ) -> int:
        if device or dtype or device_map or max_memory:
            raise InvalidParamsError(
                "a queued run runs where a worker takes it: its device, dtype and memory "
                "budget are the worker's (HEADSCOPE_DEVICE and HEADSCOPE_DTYPE where "
                "`headscope worker` runs), not the submitter's"
            )
        findings = FindingsReader(self.store, self.registry)
        prepared = jobs.prepare(self.registry, analysis, model, params, seed, findings)
        if self.store.count_runs(status="queued") >= self.max_queued:
            raise QueueFullError(self.max_queued)
        run_id = jobs.record(self.store, prepared, submitted_by)
        enqueue(self.app, self.store, run_id, prepared.model_name)
        log.info("run %s queued: %s on %s", run_id, analysis, prepared.model_name)
        return run_id

    def cancel(self, run_id: int) -> str:
        """A queued run is cancelled at once (and its job dropped); a running one
        stops at its next progress point, on whichever worker runs it."""
        status = self.store.request_cancel(run_id)
        job_id = self.store.queue_job(run_id)
        if status == "cancelled" and job_id is not None:
            self.app.job_manager.cancel_job_by_id(job_id)
        return status

    def load(self, model_name: str, placement: Any = None) -> Any:
        if self.pool is None:
            raise HeadscopeError(
                "this front end loads no models (serve --no-workers): "
                "runs load theirs on `headscope worker` processes"
            )
        return self.pool.get(model_name, placement=placement)

    def pending(self, model_name: str) -> list[int]:
        return self.store.run_ids(model=model_name, statuses=("queued", "running"))

    def close(self, timeout: float = 30.0) -> list[int]:
        """Stop the worker thread, if any (its run in flight finishes, or is left to
        another worker when `timeout` passes); nothing queued is lost."""
        if self._worker is not None:
            thread, stop = self._worker
            stop.set()
            thread.join(timeout)
        self.app.close()
        return []
