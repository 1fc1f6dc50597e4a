"""What the RPC methods work with: the store, the plugin registry, loaded models, workers.

The caller (`headscope serve`) builds the store and the registry and hands them to
`Service.open`, which is where recovery happens: runs that a dead process left
queued or running are marked interrupted before anything new is accepted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..models import ModelPool
from ..plugins import Registry
from ..workers import DEFAULT_MAX_QUEUED, ModelWorkers, settle_heap

log = logging.getLogger("headscope.service")


@dataclass
class Service:
    store: Any  # a headscope.storage.store.Store
    registry: Registry
    pool: ModelPool
    workers: ModelWorkers
    recovered: list[int]

    @classmethod
    def open(
        cls,
        store: Any,
        registry: Registry,
        torch_threads: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> Service:
        recovered = store.mark_interrupted(only_dead_owners=True)
        if recovered:
            log.info("marked runs left by a stopped process as interrupted: %s", recovered)
        for plugin in registry.plugins:
            if plugin.error:
                log.warning("plugin %s failed to load: %s", plugin.name, plugin.error)
        pool = ModelPool(registry.models)
        workers = ModelWorkers(store, registry, pool, torch_threads, max_queued)
        settle_heap()  # the libraries and plugins just imported live as long as we do
        return cls(store, registry, pool, workers, recovered)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers (running runs stop at their next progress point)."""
        left = self.workers.close(timeout)
        if left:
            log.warning("runs still working at shutdown, marked interrupted: %s", left)
        self.store.engine.dispose()
