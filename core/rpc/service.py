"""What the RPC methods work with: the store, the plugin registry, loaded models, workers.

The caller (`headscope serve`) builds the store and the registry and hands them to
`Service.open`, which is where recovery happens: runs that a dead process left
queued or running are marked interrupted before anything new is accepted.

`workers` is what takes runs: by default this process's model threads
(`ModelWorkers`); a caller may pass another with the same methods (`submit`,
`cancel`, `load`, `pending`, `close`), such as a queue in the database that
worker processes drain, which then recovers its own runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from ..models import ModelPool
from ..plugins import Registry
from ..workers import DEFAULT_MAX_QUEUED, ModelWorkers, settle_heap
from .auth import Caller

log = logging.getLogger("headscope.service")


@dataclass
class Service:
    store: Any  # a headscope.storage.store.Store
    registry: Registry
    pool: ModelPool
    workers: Any  # ModelWorkers, or another run taker with its methods
    recovered: list[int]
    caller: Caller | None = None  # who sent the request being answered

    @classmethod
    def open(
        cls,
        store: Any,
        registry: Registry,
        torch_threads: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        workers: Any = None,
        pool: ModelPool | None = None,
    ) -> Service:
        """With `workers` given, runs go to it instead of this process's threads
        (`pool`: the models it holds, if any, for models.list and models.unload)."""
        recovered = store.mark_interrupted(only_dead_owners=True)
        if recovered:
            log.info("marked runs left by a stopped process as interrupted: %s", recovered)
        for plugin in registry.plugins:
            if plugin.error:
                log.warning("plugin %s failed to load: %s", plugin.name, plugin.error)
        pool = pool or ModelPool(registry.models)
        if workers is None:
            workers = ModelWorkers(store, registry, pool, torch_threads, max_queued)
        settle_heap()  # the libraries and plugins just imported live as long as we do
        return cls(store, registry, pool, workers, recovered)

    def for_caller(self, caller: Caller) -> Service:
        """This service as one request's handlers see it: knowing who asked."""
        return replace(self, caller=caller)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers (running runs stop at their next progress point)."""
        left = self.workers.close(timeout)
        if left:
            log.warning("runs still working at shutdown, marked interrupted: %s", left)
        self.store.engine.dispose()
