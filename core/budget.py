"""Batching to a memory budget: how many prompts go into one traced pass.

Every analysis that runs many prompts hands them to `run_batched`. The batch size
comes from a budget in bytes (`--max-memory`, the `max_memory` run option, or the
memory the device has free) divided by an estimate of what one prompt row costs:
its key/value cache, the activations of one layer at a time, the padding mask and
the float32 attention rows the reads compute. Prompts are grouped by length so
little is padded. When a batch still runs out of memory, its size is halved and the
run goes on; a single prompt that does not fit is a clear error. An item may cost
several rows (`rows_per_item`: stacked patched copies of a chunk of prompts), and
`run_batched` may nest: an inner batch that cannot shrink further halves the outer.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .errors import HeadscopeError, InvalidParamsError

Item = TypeVar("Item")
Result = TypeVar("Result")

#: share of the free memory a run plans to use when no budget is given
FREE_MEMORY_SHARE = 0.5
#: at most this many prompts per batch, whatever the budget (padding and per-row
#: bookkeeping grow with the batch, speed stops growing well before this)
MAX_BATCH = 64
#: a prompt joins a batch only if padding it to the batch's longest prompt adds at
#: most this share of that width (padded tokens cost as much compute as real ones),
#: or at most PADDING_TOKENS tokens (short prompts: a pass costs more than a few pads)
MAX_PADDING = 0.1
PADDING_TOKENS = 16
#: on a CPU a pass takes at most this many tokens (prompt rows x width): a CPU has no
#: parallel width to fill, and a pass whose activations outgrow its caches costs more
#: per token than the same prompts in smaller passes (`bench/cpu_batch_width.py`:
#: 12 prompts of 2,000 tokens in one pass take 1.18x as long as one at a time, and a
#: model of Llama-3.2-1B's width slows down past the same number of tokens)
CPU_TOKENS_PER_PASS = 4096

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


class OutOfMemoryError(HeadscopeError):
    """One prompt on its own does not fit in the memory available."""


def parse_memory(value: str | int | float) -> int:
    """Bytes from `4GB`, `512MiB`, `2g`, `1.5e9` or a plain number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        amount = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidParamsError(
                f"memory budget {value!r} is not a size (examples: 8GB, 512MiB, 2000000000)"
            )
        amount = float(match.group(1)) * _UNITS[unit]
    if not amount >= 1:
        raise InvalidParamsError(f"memory budget {value!r} must be at least one byte")
    return int(amount)


def is_out_of_memory(error: BaseException) -> bool:
    """True for the errors torch raises when an allocation fails (CUDA, MPS or CPU),
    and for a nested `run_batched` whose single item did not fit."""
    if isinstance(error, (torch.OutOfMemoryError, OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_memory(device: torch.device) -> int:
    """Bytes free on the device now: the accelerator's free memory, else the host's."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 4 * 1024**3


def _model_device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype


def row_bytes(handle: Any, tokens: int) -> int:
    """Estimated bytes one prompt row of `tokens` tokens (prompt plus generated) needs.

    Key/value cache over every layer, one layer's activations (hidden states, the
    MLP's intermediate, q/k/v) in the model's dtype, the float32 attention rows the
    reads compute per layer, and the padding mask (one byte per query-key pair).
    """
    config = handle.hf_model.config
    text = getattr(config, "get_text_config", lambda: config)()
    _, dtype = _model_device_and_dtype(handle.hf_model)
    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or 0)
    intermediate = int(
        getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden
    )
    kv = handle.n_kv_heads * handle.head_dim
    q = handle.n_heads * handle.head_dim
    cache = 2 * handle.n_layers * kv * size
    activations = (4 * hidden + 3 * intermediate + q + 2 * kv) * size
    rows = 4 * handle.n_heads * 4  # a few float32 attention rows per head, per key
    per_token = cache + activations + rows
    return int(tokens * per_token + tokens * tokens)


@dataclass
class MemoryBudget:
    """Bytes a run may use for its batches; None means a share of what is free."""

    max_bytes: int | None = None

    @classmethod
    def parse(cls, value: str | int | None) -> MemoryBudget:
        return cls(None if value is None else parse_memory(value))

    def available(self, handle: Any) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        device, _ = _model_device_and_dtype(handle.hf_model)
        return int(free_memory(device) * FREE_MEMORY_SHARE)

    def batch_size(
        self, handle: Any, tokens: int, limit: int = MAX_BATCH, rows_per_item: int = 1
    ) -> int:
        """Items of `rows_per_item` prompt rows of `tokens` tokens that fit at once
        (at least 1, at most `limit`; on a CPU, at most `CPU_TOKENS_PER_PASS` tokens)."""
        fits = self.available(handle) // max(row_bytes(handle, tokens) * rows_per_item, 1)
        device, _ = _model_device_and_dtype(handle.hf_model)
        if device.type == "cpu":
            fits = min(fits, CPU_TOKENS_PER_PASS // max(tokens * rows_per_item, 1))
        return int(max(1, min(limit, fits)))


def run_batched(
    handle: Any,
    items: Sequence[Item],
    run_batch: Callable[[list[Item]], list[Result]],
    tokens: Callable[[Item], int],
    budget: MemoryBudget | None = None,
    max_batch: int = MAX_BATCH,
    progress: Callable[[int, int], None] | None = None,
    rows_per_item: int = 1,
) -> list[Result]:
    """`run_batch` over batches that fit the budget; results in the order of `items`.

    `tokens(item)` is the item's length in tokens including what will be generated;
    `run_batch(group)` returns one result per item of the group. Longest items come
    first (an out-of-memory error shows at once), and a batch holds items of similar
    length (`MAX_PADDING`, `PADDING_TOKENS`). On out-of-memory the batch size is halved and the same
    items are tried again; the smaller size is kept for the rest. On a remote model
    the whole loop runs on the server as one request (`ModelHandle.in_one_request`),
    and progress comes once, at the end.
    `progress(done, total)` is called after each batch. `rows_per_item`: the prompt
    rows one item puts in the pass (e.g. a head patched into stacked copies of a
    chunk of prompts), so the budget is divided by that many rows per item.
    """
    if getattr(handle, "remote", False):
        # every batch in one request; the server sizes and halves them itself
        results = handle.in_one_request(
            lambda: run_batched(
                handle, items, run_batch, tokens, budget, max_batch, None, rows_per_item
            )
        )
        if progress is not None:
            progress(len(items), len(items))
        return results
    if getattr(handle, "in_request", False):
        progress = None  # on the server: nobody to report to
    budget = budget or MemoryBudget()
    order = sorted(range(len(items)), key=lambda i: -tokens(items[i]))
    results: list[Any] = [None] * len(items)
    cap = max(1, max_batch)
    done = 0
    while done < len(order):
        width = tokens(items[order[done]])
        size = min(cap, budget.batch_size(handle, width, cap, rows_per_item), len(order) - done)
        shortest = min(width * (1 - MAX_PADDING), width - PADDING_TOKENS)
        while size > 1 and tokens(items[order[done + size - 1]]) < shortest:
            size -= 1
        group = order[done : done + size]
        try:
            out = run_batch([items[i] for i in group])
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            _release_memory()
            if size == 1:
                if isinstance(error, OutOfMemoryError):
                    raise  # a nested batch already said what does not fit
                what = "one prompt" if rows_per_item == 1 else f"{rows_per_item} prompt rows"
                raise OutOfMemoryError(
                    f"{what} of {width} tokens does not fit in the memory available "
                    f"({error}); use a shorter length or a device with more memory"
                ) from None
            cap = size // 2
            continue
        if len(out) != len(group):
            raise RuntimeError(f"a batch of {len(group)} gave {len(out)} results")
        for index, result in zip(group, out, strict=True):
            results[index] = result
        done += size
        if progress is not None:
            progress(done, len(order))
    return results


#: a per-item loop on a remote model goes to the server in at most this many requests,
#: so progress and cancellation still come at least this often
REQUESTS_PER_LOOP = 16


def run_each(
    handle: Any,
    items: Sequence[Item],
    work: Callable[[Item], Result],
    progress: Callable[[int, int], None] | None = None,
) -> list[Result]:
    """`work(item)` for every item, in order, for work bigger than a batch (each item
    may run batch loops of its own, such as one candidate head scored on a task).

    Locally the items run one by one, `progress(done, total)` after each. On a remote
    model they go in at most `REQUESTS_PER_LOOP` requests of consecutive items, each
    run on the server (`ModelHandle.in_one_request`), with progress after each
    request; `work` then follows `run_batched`'s rules for code run on the server.
    """
    total = len(items)
    remote = bool(getattr(handle, "remote", False))
    per_request = -(-total // REQUESTS_PER_LOOP) if remote else 1
    results: list[Result] = []
    for start in range(0, total, max(1, per_request)):
        chunk = list(items[start : start + per_request])
        if remote:
            results += handle.in_one_request(lambda chunk=chunk: [work(i) for i in chunk])
        else:
            results += [work(item) for item in chunk]
        if progress is not None and not getattr(handle, "in_request", False):
            progress(len(results), total)
    return results


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
