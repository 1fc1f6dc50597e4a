"""Per-head activation patching and its gradient approximation, for every head.

Activation patching runs the model on one input while one head's output is taken
from a paired input, and records how the task metric moves:

- noising (clean <- corrupted): a head the task needs drops the metric;
- denoising (corrupted <- clean): a head that carries the task restores it.

Each head costs a forward pass over the prompts; `patch_every_head` packs many
patched copies of the prompt batch into one pass (`RowHeadPatch`: copy i patches
head i). Both batch to the run's memory budget (`core.budget.run_batched`): a
pass that runs out of memory is halved, first in heads, then in prompts. Attribution patching approximates the noising effect of every head at
once from one forward-and-backward on the clean prompts and one forward on the
corrupted ones (`gradients`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from headscope.core.budget import MemoryBudget, run_batched
from headscope.core.models import ModelHandle
from headscope.core.tasks import TaskData, TaskPair
from headscope.core.tracing import Batch, HeadOutputs, RowHeadPatch, forward

from .gradients import head_output_gradients

Progress = Callable[[int, int, str], None]
DIRECTIONS = ("noising", "denoising")


@dataclass
class PatchingResult:
    """Mean metric change per head [layers, heads] for each direction run."""

    effects: dict[str, torch.Tensor]  # "noising" / "denoising" -> [L, H]
    clean: torch.Tensor  # [n] metric on the clean prompts
    corrupted: torch.Tensor  # [n] metric on the corrupted prompts
    forward_passes: int


class PairOutcome(NamedTuple):
    """One pair's metric, clean and corrupted, and per direction its change [heads]
    when each head (in `handle.heads()` order) is patched."""

    clean: torch.Tensor
    corrupted: torch.Tensor
    changes: dict[str, torch.Tensor]
    passes: int  # forward passes its chunk ran, on the chunk's first pair (else 0)


def repeat_batch(batch: Batch, copies: int) -> Batch:
    """`copies` stacked copies of a batch (rows c * b + r = row r)."""
    return Batch(
        batch.input_ids.repeat(copies, 1),
        batch.attention_mask.repeat(copies, 1),
        list(batch.lengths) * copies,
    )


def patch_every_head(
    handle: ModelHandle,
    data: TaskData,
    directions: Sequence[str] = DIRECTIONS,
    rows_per_pass: int = 64,
    progress: Progress | None = None,
    budget: MemoryBudget | None = None,
) -> PatchingResult:
    """Patch each head alone, in each direction; effects averaged over the pairs.

    Pairs run in chunks that fit the memory `budget`; each pass patches a group of
    heads into stacked copies of a chunk (one copy per head), as many copies as the
    budget and `rows_per_pass` (prompt rows per pass, at most) allow.
    """
    heads = handle.heads()
    layers = list(range(handle.n_layers))
    total = len(directions) * len(heads) * len(data)  # patched prompt rows
    finished = 0  # pairs whose chunk is done

    def run_chunk(pairs: list[TaskPair]) -> list[PairOutcome]:
        chunk = data.with_pairs(pairs)
        size = len(chunk)
        metric = chunk.metric()
        batches = {"clean": chunk.clean_batch(handle), "corrupted": chunk.corrupted_batch(handle)}
        # passes counted in a list, not `nonlocal`: on a remote model this runs on
        # the server, and the count comes back with the outcomes
        passes = [len(batches)]
        outputs, metrics = {}, {}
        for name, batch in batches.items():
            result = forward(handle, batch, [HeadOutputs(layers)])
            outputs[name] = {layer: result.get("heads", layer) for layer in layers}
            metrics[name] = metric(result.logits)
        changes = {}
        for index, direction in enumerate(directions):
            base, source = (
                ("clean", "corrupted") if direction == "noising" else ("corrupted", "clean")
            )

            def patch_group(group, base=base, source=source) -> list[torch.Tensor]:
                batch = repeat_batch(batches[base], len(group))
                patch = RowHeadPatch(
                    row_heads=[[head] for head in group for _ in range(size)],
                    source=outputs[source],
                    source_rows=list(range(size)) * len(group),
                )
                logits = forward(handle, batch, [patch]).logits
                passes.append(1)
                changed = metric.tiled(len(group))(logits).view(len(group), size)
                return list(changed - metrics[base])  # per head: [size]

            def report(done: int, _total: int, index=index, direction=direction) -> None:
                if progress is not None:
                    rows = finished * len(directions) * len(heads)
                    rows += (index * len(heads) + done) * size
                    progress(rows, total, f"{direction}: heads {done}/{len(heads)}")

            per_head = run_batched(
                handle,
                heads,
                patch_group,
                tokens=lambda _head, base=base: batches[base].width,
                budget=budget,
                max_batch=max(1, rows_per_pass // size),
                progress=report,
                rows_per_item=size,
            )
            changes[direction] = torch.stack(per_head).T  # [size, heads]
        return [
            PairOutcome(
                metrics["clean"][row],
                metrics["corrupted"][row],
                {d: c[row] for d, c in changes.items()},
                sum(passes) if row == 0 else 0,
            )
            for row in range(size)
        ]

    def chunk_done(done: int, _total: int) -> None:
        nonlocal finished
        finished = done

    per_pair = run_batched(
        handle,
        data.pairs,
        run_chunk,
        tokens=lambda pair: len(pair.clean),
        budget=budget,
        max_batch=max(1, rows_per_pass),
        progress=chunk_done,
    )
    shape = (handle.n_layers, handle.n_heads)
    n = len(data)
    return PatchingResult(
        effects={
            d: (torch.stack([p.changes[d] for p in per_pair]).sum(0) / n).view(shape)
            for d in directions
        },
        clean=torch.stack([p.clean for p in per_pair]),
        corrupted=torch.stack([p.corrupted for p in per_pair]),
        forward_passes=sum(p.passes for p in per_pair),
    )


def attribute_every_head(
    handle: ModelHandle,
    data: TaskData,
    rows_per_pass: int = 64,
    progress: Progress | None = None,
    budget: MemoryBudget | None = None,
) -> torch.Tensor:
    """Estimated noising effect per head [L, H], averaged over the pairs:
    sum over positions of (corrupted - clean head output) . d metric / d output.

    Pairs run in batches of at most `rows_per_pass` that fit the memory `budget`; the
    backward pass keeps every layer's activations, so a pair counts as one prompt row
    per layer."""
    layers = list(range(handle.n_layers))

    def attribute(pairs: list[TaskPair]) -> list[torch.Tensor]:
        chunk = data.with_pairs(pairs)
        clean_batch = chunk.clean_batch(handle)
        grads = head_output_gradients(handle, clean_batch, chunk.metric(), layers)
        corrupted = forward(
            handle, chunk.corrupted_batch(handle), [HeadOutputs(layers)], logits_at=None
        )
        valid = clean_batch.valid()[:, :, None, None].float()
        per_layer = []
        for layer in layers:
            diff = corrupted.get("heads", layer) - grads.activations[layer]
            per_layer.append((diff * grads.gradients[layer] * valid).sum(dim=(1, 3)))  # [b, H]
        return list(torch.stack(per_layer, dim=1))  # per pair: [L, H]

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, f"attribution: pairs {done}/{total}")

    per_pair = run_batched(
        handle,
        data.pairs,
        attribute,
        tokens=lambda pair: len(pair.clean),
        budget=budget,
        max_batch=max(1, rows_per_pass),
        progress=report,
        rows_per_item=handle.n_layers,
    )
    return torch.stack(per_pair).sum(0) / len(data)
