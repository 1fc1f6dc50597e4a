"""Per-head activation patching and its gradient approximation, for every head.

Activation patching runs the model on one input while one head's output is taken
from a paired input, and records how the task metric moves:

- noising (clean <- corrupted): a head the task needs drops the metric;
- denoising (corrupted <- clean): a head that carries the task restores it.

Each head costs a forward pass over the prompts; `patch_every_head` packs many
patched copies of the prompt batch into one pass (`RowHeadPatch`: copy i patches
head i). Attribution patching approximates the noising effect of every head at
once from one forward-and-backward on the clean prompts and one forward on the
corrupted ones (`gradients`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from headscope.core.models import ModelHandle
from headscope.core.tasks import TaskData
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
) -> PatchingResult:
    """Patch each head alone, in each direction; effects averaged over the pairs."""
    heads = handle.heads()
    layers = list(range(handle.n_layers))
    chunks = data.chunks(max(1, rows_per_pass))
    per_pass = [max(1, rows_per_pass // len(chunk)) for chunk in chunks]
    total = len(directions) * sum(-(-len(heads) // k) for k in per_pass)
    done = 0
    sums = {d: torch.zeros(handle.n_layers, handle.n_heads) for d in directions}
    clean_all, corrupted_all = [], []
    passes = 0
    for chunk, copies in zip(chunks, per_pass, strict=True):
        metric = chunk.metric()
        batches = {"clean": chunk.clean_batch(handle), "corrupted": chunk.corrupted_batch(handle)}
        outputs, metrics = {}, {}
        for name, batch in batches.items():
            result = forward(handle, batch, [HeadOutputs(layers)])
            outputs[name] = {layer: result.get("heads", layer) for layer in layers}
            metrics[name] = metric(result.logits)
            passes += 1
        clean_all.append(metrics["clean"])
        corrupted_all.append(metrics["corrupted"])
        for direction in directions:
            base, source = (
                ("clean", "corrupted") if direction == "noising" else ("corrupted", "clean")
            )
            size = len(chunk)
            for start in range(0, len(heads), copies):
                group = heads[start : start + copies]
                batch = repeat_batch(batches[base], len(group))
                patch = RowHeadPatch(
                    row_heads=[[head] for head in group for _ in range(size)],
                    source=outputs[source],
                    source_rows=list(range(size)) * len(group),
                )
                logits = forward(handle, batch, [patch]).logits
                changed = metric.tiled(len(group))(logits).view(len(group), size)
                delta = (changed - metrics[base]).sum(1)
                for (layer, head), value in zip(group, delta, strict=True):
                    sums[direction][layer, head] += value
                passes += 1
                done += 1
                if progress is not None:
                    progress(done, total, f"{direction}: heads {start + len(group)}/{len(heads)}")
    n = len(data)
    return PatchingResult(
        effects={d: s / n for d, s in sums.items()},
        clean=torch.cat(clean_all),
        corrupted=torch.cat(corrupted_all),
        forward_passes=passes,
    )


def attribute_every_head(
    handle: ModelHandle, data: TaskData, rows_per_pass: int = 64, progress: Progress | None = None
) -> torch.Tensor:
    """Estimated noising effect per head [L, H], averaged over the pairs:
    sum over positions of (corrupted - clean head output) . d metric / d output."""
    layers = list(range(handle.n_layers))
    total = torch.zeros(handle.n_layers, handle.n_heads)
    chunks = data.chunks(max(1, rows_per_pass))
    for index, chunk in enumerate(chunks):
        clean_batch = chunk.clean_batch(handle)
        grads = head_output_gradients(handle, clean_batch, chunk.metric(), layers)
        corrupted = forward(
            handle, chunk.corrupted_batch(handle), [HeadOutputs(layers)], logits_at=None
        )
        valid = clean_batch.valid()[:, :, None, None].float()
        for layer in layers:
            diff = corrupted.get("heads", layer) - grads.activations[layer]
            total[layer] += (diff * grads.gradients[layer] * valid).sum(dim=(0, 1, 3))
        if progress is not None:
            progress(index + 1, len(chunks), f"attribution: batch {index + 1}/{len(chunks)}")
    return total / len(data)
