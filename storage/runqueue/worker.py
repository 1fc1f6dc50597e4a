"""`headscope worker`: a process that takes queued runs for its models and runs them.

It keeps its models loaded and takes one run at a time (nnsight traces on one
model must not overlap; run more worker processes for more at once). Faults:

- a worker killed mid-run stops sending heartbeats; every worker looks for jobs of
  workers silent for `stalled_after` seconds and puts them back in the queue, up to
  `max_attempts` attempts, after which the run is failed with the reason;
- a retried run starts again from the beginning: findings are written in one
  transaction at the end, so a killed attempt leaves none, and a run is never
  stored twice (the store refuses to finish a finished run);
- a cancel (`runs.cancel` on any front end) is seen at the run's next progress point;
- when the database goes away (a restart), store calls wait and reconnect, and the
  worker itself reconnects; the run in flight carries on once the database is back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError

from ...core import jobs
from ...core.errors import HeadscopeError
from ...core.models import ModelPool
from ...core.runs import FINISHED
from ...core.workers import settle_heap
from .backend import DEFAULT_MAX_ATTEMPTS, TASK_NAME, connection_info, ensure_schema, queue_for

log = logging.getLogger("headscope.worker")

DEFAULT_HEARTBEAT_S = 5.0
DEFAULT_STALLED_AFTER_S = 30.0
#: how long a store call waits for the database to come back before giving up
DEFAULT_PATIENCE_S = 300.0
_RECONNECT_DELAYS = (0.5, 1, 2, 5, 10)


def gave_up_reason(attempts: int, stalled_after: float) -> str:
    return (
        f"the worker running it stopped (no heartbeat for {stalled_after:g} s) "
        f"{attempts} times; given up after {attempts} attempts"
    )


class PatientStore:
    """The store, waiting out a database restart: a call that fails on a lost or
    refused connection is retried on a fresh one until `patience` seconds pass."""

    def __init__(self, store: Any, patience: float = DEFAULT_PATIENCE_S):
        self._store, self._patience = store, patience

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._store, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + self._patience
            for attempt in itertools.count():
                try:
                    return value(*args, **kwargs)
                except (OperationalError, InterfaceError) as error:
                    if time.monotonic() > deadline:
                        raise
                    log.warning("database unreachable in %s (%s); retrying", name, error)
                    time.sleep(reconnect_delay(attempt))

        return call


def reconnect_delay(attempt: int) -> float:
    """Seconds to wait before the attempt'th reconnection: backing off to 10 s."""
    return _RECONNECT_DELAYS[min(attempt, len(_RECONNECT_DELAYS) - 1)]


class QueueWorker:
    """Takes runs for `models` (all models when empty) from the queue at `url`."""

    def __init__(
        self,
        store: Any,
        registry: Any,
        models: Sequence[str] = (),
        pool: ModelPool | None = None,
        heartbeat: float = DEFAULT_HEARTBEAT_S,
        stalled_after: float = DEFAULT_STALLED_AFTER_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        patience: float = DEFAULT_PATIENCE_S,
        poll_interval: float = 1.0,
    ):
        if stalled_after <= 2 * heartbeat:
            raise HeadscopeError("--stalled-after must be more than twice --heartbeat")
        self.store = PatientStore(store, patience)
        self.registry = registry
        self.pool = pool or ModelPool(registry.models)
        self.models = [registry.models.resolve(name).name for name in models]
        self.heartbeat, self.stalled_after = heartbeat, stalled_after
        self.max_attempts, self.poll_interval = max_attempts, poll_interval
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.retried = 0  # stalled jobs this worker put back in the queue

    @property
    def queues(self) -> list[str] | None:
        return [queue_for(name) for name in self.models] or None

    def preload(self) -> None:
        """Load every model this worker serves, once, before taking runs."""
        for name in self.models:
            log.info("loading %s", name)
            self.pool.get(name)
        settle_heap()

    # -- running -------------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        """Take runs until `stop` is set; the run in flight is finished first."""
        asyncio.run(self._serve(stop))

    async def _serve(self, stop: threading.Event) -> None:
        from procrastinate import App, PsycopgConnector

        conninfo = connection_info(self.store.url)
        failures = 0
        while not stop.is_set():
            try:
                await asyncio.to_thread(ensure_schema, conninfo)
                app = App(connector=PsycopgConnector(conninfo=conninfo, min_size=1, max_size=4))
                app.task(name=TASK_NAME, pass_context=True)(self._run_job)
                async with app.open_async():
                    failures = 0
                    await self._work(app, stop)
            except Exception as error:  # the database went away: wait, reconnect
                if stop.is_set():
                    break
                delay = reconnect_delay(failures)
                failures += 1
                log.warning("queue unreachable (%s); reconnecting in %g s", error, delay)
                await asyncio.sleep(delay)

    async def _work(self, app: Any, stop: threading.Event) -> None:
        worker = asyncio.create_task(
            app.run_worker_async(
                queues=self.queues,
                name=self.name,
                concurrency=1,
                install_signal_handlers=False,
                update_heartbeat_interval=self.heartbeat,
                stalled_worker_timeout=self.stalled_after,
                fetch_job_polling_interval=self.poll_interval,
                abort_job_polling_interval=self.poll_interval,
            )
        )
        sweeper = asyncio.create_task(self._recover_stalled(app))
        try:
            while not stop.is_set() and not worker.done():
                await asyncio.sleep(0.2)
        finally:
            sweeper.cancel()
            if not worker.done():
                worker.cancel()  # procrastinate stops taking jobs, finishes the current one
            try:
                await worker
            except asyncio.CancelledError:
                pass

    def _run_job(self, context: Any, run_id: int) -> None:
        """The task: run one recorded run (from the start, on a retry too)."""
        store = self.store
        run = store.get_run(run_id)
        if run.status in FINISHED:  # cancelled while queued, or finished by an attempt
            log.info("run %s is %s; nothing to do", run_id, run.status)
            return
        attempt = context.job.attempts + 1
        log.info("run %s started (attempt %s): %s on %s", run_id, attempt, run.analysis, run.model)
        try:
            prepared = jobs.prepare(self.registry, run.analysis, run.model, run.params, run.seed)
        except HeadscopeError as error:  # say an analysis this worker lacks
            store.fail_run(run_id, f"{error} (on worker {self.name})")
            return
        summary = jobs.execute(
            store,
            self.registry,
            run_id,
            prepared,
            model_loader=lambda: self.pool.get(prepared.model_name),
        )
        log.info("run %s %s", run_id, summary.status)

    async def _recover_stalled(self, app: Any) -> None:
        """Put back jobs of silent workers, or fail their runs after the last attempt."""
        from procrastinate.jobs import Status

        manager = app.job_manager
        while True:
            await asyncio.sleep(self.heartbeat)
            try:
                stalled = await manager.get_stalled_jobs(
                    task_name=TASK_NAME, seconds_since_heartbeat=self.stalled_after
                )
            except Exception as error:
                log.warning("could not look for stalled runs: %s", error)
                continue
            for job in stalled:
                run_id = job.task_kwargs.get("run_id")
                attempts = job.attempts + 1
                try:
                    if attempts >= self.max_attempts:
                        await manager.finish_job(job, Status.FAILED, delete_job=False)
                        reason = gave_up_reason(attempts, self.stalled_after)
                        await asyncio.to_thread(self.store.fail_run, run_id, reason)
                        log.warning("run %s failed: %s", run_id, reason)
                    else:
                        await manager.retry_job(job)
                        self.retried += 1
                        log.warning("run %s: its worker stopped; queued again", run_id)
                except Exception as error:  # another worker handled it first
                    log.info("stalled run %s left to another worker: %s", run_id, error)
