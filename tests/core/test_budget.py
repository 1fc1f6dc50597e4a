"""Batching to a memory budget: sizes, order, and halving on out-of-memory."""

from __future__ import annotations

import pytest
import torch

from headscope.core.budget import (
    MemoryBudget,
    OutOfMemoryError,
    is_out_of_memory,
    parse_memory,
    row_bytes,
    run_batched,
)
from headscope.core.errors import InvalidParamsError

from helpers.models import tiny_handle


@pytest.mark.parametrize(
    "text,expected",
    [
        ("8GB", 8 * 10**9),
        ("512MiB", 512 * 2**20),
        ("2g", 2 * 10**9),
        ("1.5e9", 1_500_000_000),
        ("1000", 1000),
        (4096, 4096),
        (" 3 kib ", 3072),
    ],
)
def test_memory_sizes_parse(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "8 parsecs", "-1GB", "0", "GB"])
def test_bad_memory_sizes_are_clear_errors(text):
    with pytest.raises(InvalidParamsError, match="memory budget"):
        parse_memory(text)


def test_row_estimate_grows_with_tokens_and_budget_sets_batch_size():
    handle = tiny_handle("llama")
    small, large = row_bytes(handle, 100), row_bytes(handle, 200)
    assert 0 < small < large
    budget = MemoryBudget(10 * large)
    assert budget.batch_size(handle, 200) == 10
    assert budget.batch_size(handle, 200, limit=4) == 4
    assert MemoryBudget(1).batch_size(handle, 200) == 1  # never fewer than one
    assert MemoryBudget().batch_size(handle, 200) >= 1  # from the free memory


def test_batches_follow_the_budget_and_results_keep_the_item_order():
    handle = tiny_handle("llama")
    items = [300, 100, 500, 200, 400, 500]
    seen = []

    def run(group):
        seen.append(list(group))
        return [f"r{item}" for item in group]

    budget = MemoryBudget(2 * row_bytes(handle, 500))
    out = run_batched(handle, items, run, tokens=lambda n: n, budget=budget)
    assert out == [f"r{item}" for item in items]
    assert seen[0] == [500, 500]  # longest first, two per batch at 500 tokens
    assert [400] in seen  # 300 tokens would pad by a quarter: not in 400's batch
    assert sorted(n for group in seen for n in group) == sorted(items)
    assert all(len(group) * row_bytes(handle, max(group)) <= budget.max_bytes for group in seen)


def test_short_prompts_a_few_tokens_apart_share_a_batch():
    handle = tiny_handle("llama")
    seen = []

    def run(group):
        seen.append(list(group))
        return group

    run_batched(handle, [13, 18, 15, 40], run, tokens=lambda n: n, budget=MemoryBudget(10**9))
    assert seen == [[40], [18, 15, 13]]  # 5 pads on 18 tokens is cheap; 22 on 40 is not


def test_an_out_of_memory_batch_is_halved_and_the_run_goes_on():
    handle = tiny_handle("llama")
    sizes, progress = [], []

    def run(group):
        sizes.append(len(group))
        if len(group) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [item * 10 for item in group]

    items = list(range(9))
    out = run_batched(
        handle,
        items,
        run,
        tokens=lambda _: 16,
        budget=MemoryBudget(10**12),
        max_batch=8,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert out == [item * 10 for item in items]
    assert sizes[:3] == [8, 4, 2]  # halved until it fits, then kept
    assert all(size <= 2 for size in sizes[3:])
    assert progress[-1] == (9, 9)


def test_a_runtime_out_of_memory_counts_and_other_errors_pass_through():
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    handle = tiny_handle("llama")

    def broken(group):
        raise ValueError("a bug, not memory")

    with pytest.raises(ValueError, match="a bug"):
        run_batched(handle, [1, 2], broken, tokens=lambda _: 8)


def test_one_prompt_that_does_not_fit_is_a_clear_error():
    handle = tiny_handle("llama")

    def never_fits(group):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(OutOfMemoryError, match="one prompt of 8 tokens does not fit"):
        run_batched(handle, [1, 2, 3], never_fits, tokens=lambda _: 8, budget=MemoryBudget(1))


def test_an_item_of_several_rows_divides_the_budget_by_its_rows():
    handle = tiny_handle("llama")
    row = row_bytes(handle, 32)
    budget = MemoryBudget(12 * row)
    assert budget.batch_size(handle, 32, rows_per_item=3) == 4
    assert budget.batch_size(handle, 32, rows_per_item=24) == 1  # never fewer than one
    seen = []

    def run(group):
        seen.append(len(group))
        return list(group)

    items = list(range(10))
    out = run_batched(handle, items, run, tokens=lambda _: 32, budget=budget, rows_per_item=3)
    assert out == items and max(seen) == 4


def test_a_nested_batch_that_cannot_shrink_halves_the_outer_batch():
    handle = tiny_handle("llama")
    outer_sizes = []

    def inner(rows):
        # each inner item is as many rows as the outer group: 2 rows fit at most
        def run(group):
            if len(group) * rows > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return [rows * item for item in group]

        return run

    def outer(group):
        outer_sizes.append(len(group))
        per_item = run_batched(
            handle, [1, 2, 3], inner(len(group)), tokens=lambda _: 8, rows_per_item=len(group)
        )
        return [item + sum(per_item) for item in group]

    items = list(range(8))
    out = run_batched(handle, items, outer, tokens=lambda _: 8, budget=MemoryBudget(10**12))
    assert out == [item + 2 * 6 for item in items]  # outer groups of 2 in the end
    assert outer_sizes == [8, 4, 2, 2, 2, 2]

    def hopeless(group):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(OutOfMemoryError, match="3 prompt rows of 8 tokens does not fit"):
        run_batched(
            handle,
            [0, 1],
            lambda group: run_batched(handle, [0], hopeless, lambda _: 8, rows_per_item=3),
            tokens=lambda _: 8,
        )
