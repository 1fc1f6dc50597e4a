"""Simulated out-of-memory: a traced call that fails for batches above a size."""

from __future__ import annotations

import torch


def short_of_memory(monkeypatch, module, name: str, rows: int) -> list[int]:
    """Make `module.name(handle, batch, ...)` raise torch's out-of-memory error for
    batches of more than `rows` rows; returns the batch sizes it is called with."""
    sizes: list[int] = []
    real = getattr(module, name)

    def limited(handle, batch, *args, **kwargs):
        sizes.append(batch.size)
        if batch.size > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(handle, batch, *args, **kwargs)

    monkeypatch.setattr(module, name, limited)
    return sizes
