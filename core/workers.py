"""Background runs: one worker thread per model, running its queue in order.

nnsight traces on one model must never overlap, so every run on a model goes
through that model's single worker thread, the only thread that runs its traces;
runs on different models proceed side by side. `submit` checks the analysis,
params, model name and the stored runs the params name, records the run (nothing
is stored for bad input) and returns its id at once; checks that need the loaded
model happen when the run starts and fail the run with their reason. At most `max_queued` runs wait at once,
across models: beyond that `submit` refuses and stores nothing, so a client in a
loop cannot fill the store with runs that would wait for hours. Cancellation is
cooperative: the run stops at its next progress point. On `close`, queued runs and
runs stopped by the shutdown are recorded as interrupted (a user's cancel stays
"cancelled").
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import jobs
from .analysis import FindingsReader
from .errors import HeadscopeError

log = logging.getLogger("headscope.workers")

STOPPED_BY_SHUTDOWN = "the service stopped before the run finished"
DEFAULT_MAX_QUEUED = 100


class ShuttingDownError(HeadscopeError):
    """No new runs: the workers are closing."""


class QueueFullError(HeadscopeError):
    """No new runs for now: as many runs as allowed are waiting."""

    def __init__(self, max_queued: int):
        super().__init__(
            f"the queue is full: {max_queued} runs are waiting; "
            "submit again when some have started, or cancel some"
        )
        self.data = {"max_queued": max_queued}


def settle_heap() -> None:
    """Exempt what is alive now (libraries, loaded models) from garbage collection.

    A loaded model and its libraries are hundreds of thousands of long-lived
    objects; every full collection walks them all, holding the GIL for hundreds
    of milliseconds and stalling requests. Freezing them after a collection
    leaves later collections only the objects made since.
    """
    gc.collect()
    gc.freeze()


@dataclass
class _Job:
    run_id: int
    prepared: jobs.PreparedRun
    stop: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False  # stopped because the service is closing
    started: bool = False  # its worker has taken it from the queue

    @property
    def waiting(self) -> bool:
        """Queued and still to run (a cancelled run is only waiting to be dropped)."""
        return not self.started and not self.stop.is_set()


class ModelWorkers:
    """Queues and runs analyses, one thread per model name."""

    def __init__(
        self,
        store: Any,
        registry: Any,
        pool: Any,
        torch_threads: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ):
        self.store, self.registry, self.pool = store, registry, pool
        self.torch_threads = torch_threads  # per worker; None: torch's default
        self.max_queued = max_queued
        self._queues: dict[str, queue.Queue[_Job | None]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._active: dict[int, _Job] = {}  # queued or running, by run id
        self._lock = threading.Lock()
        self._closing = False

    # -- requests ------------------------------------------------------------------------
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
        """Validate (the placement and memory budget too), record as queued (by the
        named token) and enqueue; returns the run id."""
        findings = FindingsReader(self.store, self.registry)
        prepared = jobs.prepare(
            self.registry,
            analysis,
            model,
            params,
            seed,
            findings,
            device,
            dtype,
            device_map,
            max_memory,
        )
        with self._lock:
            if self._closing:
                raise ShuttingDownError("the service is shutting down; no new runs")
            if sum(job.waiting for job in self._active.values()) >= self.max_queued:
                raise QueueFullError(self.max_queued)
            run_id = jobs.record(self.store, prepared, submitted_by)
            job = _Job(run_id, prepared)
            self._active[run_id] = job
            self._queue_for(prepared.model_name).put(job)
        log.info("run %s queued: %s on %s", run_id, analysis, prepared.model_name)
        return run_id

    def cancel(self, run_id: int) -> str:
        """Ask a run to stop; returns its status (queued runs are cancelled at once)."""
        status = self.store.request_cancel(run_id)
        with self._lock:
            job = self._active.get(run_id)
        if job is not None:
            job.stop.set()
        return status

    def load(self, model_name: str, placement: Any = None) -> Any:
        """The model's handle on `placement` (default: the environment's or auto),
        loading it if needed (and then settling the heap)."""
        fresh = not self.pool.is_loaded(model_name, placement)
        handle = self.pool.get(model_name, placement=placement)
        if fresh:
            settle_heap()
        return handle

    def pending(self, model_name: str) -> list[int]:
        """Ids of runs queued or running on a model."""
        with self._lock:
            return [j.run_id for j in self._active.values() if j.prepared.model_name == model_name]

    # -- shutdown ------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> list[int]:
        """Stop taking runs, stop the running ones, wait; returns runs left unfinished."""
        with self._lock:
            self._closing = True
            stopping = list(self._active.values())
            queues = list(self._queues.values())
            threads = list(self._threads.values())
        for job in stopping:
            job.shutdown = True
            job.stop.set()
        for waiting in queues:
            waiting.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = []
        for job in stopping:  # a run that ignored the stop within the timeout
            if self.store.get_run(job.run_id).status in ("queued", "running"):
                self.store.fail_run(job.run_id, STOPPED_BY_SHUTDOWN, status="interrupted")
                unfinished.append(job.run_id)
        return unfinished

    # -- the workers ---------------------------------------------------------------------
    def _queue_for(self, model_name: str) -> queue.Queue[_Job | None]:
        """The model's queue, starting its worker thread on first use (lock held)."""
        if model_name not in self._queues:
            waiting: queue.Queue[_Job | None] = queue.Queue()
            thread = threading.Thread(
                target=self._work, args=(waiting,), name=f"worker:{model_name}", daemon=True
            )
            self._queues[model_name], self._threads[model_name] = waiting, thread
            thread.start()
        return self._queues[model_name]

    def _work(self, waiting: queue.Queue[_Job | None]) -> None:
        if self.torch_threads:  # fewer threads leave cores to the service's requests
            import torch

            torch.set_num_threads(self.torch_threads)
        while (job := waiting.get()) is not None:
            job.started = True
            try:
                self._run(job)
            except Exception:  # the store failed: keep the worker alive for the next run
                log.exception("worker failed on run %s", job.run_id)
            finally:
                with self._lock:
                    self._active.pop(job.run_id, None)

    def _run(self, job: _Job) -> None:
        if self.store.get_run(job.run_id).status != "queued":
            return  # cancelled while it waited
        if job.shutdown:
            self.store.fail_run(job.run_id, STOPPED_BY_SHUTDOWN, status="interrupted")
            return
        name = job.prepared.model_name
        log.info("run %s started", job.run_id)
        summary = jobs.execute(
            self.store,
            self.registry,
            job.run_id,
            job.prepared,
            model_loader=lambda: self.load(name, job.prepared.placement),
            cancel_event=job.stop,
        )
        status = summary.status
        if job.shutdown and status == "cancelled" and not self.store.cancel_requested(job.run_id):
            self.store.fail_run(job.run_id, STOPPED_BY_SHUTDOWN, status="interrupted")
            status = "interrupted"
        log.info("run %s %s", job.run_id, status)
