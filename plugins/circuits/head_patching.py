"""head-patching: per-head activation patching on a task, the reference for circuits.

For every head, its output on the clean prompt is replaced with its output on
the corrupted partner (noising: clean <- corrupted) and/or the other way round
(denoising: corrupted <- clean), at every position, and the task metric is
recorded. Effects are normalised by the clean-minus-corrupted gap of the metric:

- noising_effect = mean(M(clean, head patched) - M(clean)) / gap: about -1 when
  the head alone carries the task, positive for heads that work against it;
- denoising_effect = mean(M(corrupted, head patched) - M(corrupted)) / gap;
- attribution = the gradient estimate of noising_effect (always computed; it is
  the whole analysis in `mode=attribution`);
- importance = the largest absolute effect measured: the ranking circuits are
  judged by.

Many patched copies of the prompt batch go through the model in one pass, as many
as the run's memory budget allows (at most `rows_per_pass` prompt rows).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from headscope.core.analysis import Analysis, Finding, RunContext
from headscope.core.budget import MemoryBudget
from headscope.core.plots import head_heatmap
from headscope.core.tasks import TaskData, prepare_task, score_task
from headscope.plugins.circuits.patching import attribute_every_head, patch_every_head


class HeadPatchingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field("ioi", description="Task name (`headscope tasks list`) or jsonl:PATH.")
    n_examples: int = Field(8, ge=1, le=10_000, description="Clean/corrupted prompt pairs.")
    mode: Literal["full", "attribution"] = Field(
        "full",
        description="full: one patched run per head (plus attribution); attribution: "
        "gradient estimate only (2 forwards + 1 backward).",
    )
    directions: Literal["noising", "denoising", "both"] = Field(
        "noising",
        description="noising: clean <- corrupted; denoising: corrupted <- clean; both.",
    )
    rows_per_pass: int = Field(
        64,
        ge=1,
        le=4096,
        description="Prompt rows per forward pass at most (fewer when memory is short).",
    )


class HeadPatching(Analysis):
    name = "head-patching"
    version = "1"
    summary = "Per-head activation patching (and attribution patching) on a task."
    Params = HeadPatchingParams
    primary_metric = "importance"
    head_selection = ("top", 15)

    @classmethod
    def check(cls, params: HeadPatchingParams, handle, registry) -> None:
        task = registry.task(params.task)
        prepare_task(handle, task, params.n_examples, np.random.default_rng(0))

    def run(self, ctx: RunContext, params: HeadPatchingParams) -> Finding:
        handle = ctx.model
        task = ctx.registry.task(params.task)
        data = prepare_task(handle, task, params.n_examples, ctx.rng)
        finding = Finding()
        scores = describe_task(finding, handle, data, params.rows_per_pass, ctx.budget)
        gap = scores["metric_clean"] - scores["metric_corrupted"]
        effects = reference_effects(
            ctx, data, gap, params.mode, params.directions, params.rows_per_pass
        )
        for name, value in effects.items():
            if isinstance(value, torch.Tensor):
                finding.add_head_scores(name, value)
            else:
                finding.add_metric(name, value)
        figure = head_heatmap(
            effects["importance"].numpy(), f"importance on {task.name} ({handle.name})"
        )
        finding.add_figure("importance.png", figure, "largest absolute patching effect per head")
        return finding


def describe_task(
    finding: Finding, handle, data: TaskData, batch_size: int, budget: MemoryBudget | None = None
) -> dict:
    """Accuracy and metric gap on the task's pairs, as run metrics."""
    summary = score_task(handle, data, batch_size, budget).summary()
    for name, value in summary.items():
        finding.add_metric(name, value)
    finding.add_metric("n_pairs", len(data))
    finding.add_metric("dropped_examples", sum(data.dropped.values()))
    finding.summary["task"] = {**data.task.describe(), "dropped": data.dropped}
    return summary


def reference_effects(
    ctx: RunContext,
    data: TaskData,
    gap: float,
    mode: str = "full",
    directions: str = "noising",
    rows_per_pass: int = 64,
) -> dict[str, torch.Tensor | float]:
    """Patching effects per head ([L, H] tensors) and timings; effects are divided by
    `gap`, the mean clean-minus-corrupted metric (1 when there is none)."""
    handle = ctx.model
    gap = gap if abs(gap) > 1e-6 else 1.0
    out: dict[str, torch.Tensor | float] = {"metric_gap": gap}

    def progress(stage: str):
        return lambda done, total, message: ctx.progress(done, total, f"{stage}: {message}")

    started = time.perf_counter()
    attribution = attribute_every_head(
        handle, data, rows_per_pass, progress("attribution"), ctx.budget
    )
    out["attribution_seconds"] = time.perf_counter() - started
    if mode == "attribution":
        out["attribution"] = attribution / gap
        out["importance"] = out["attribution"].abs()
        return out
    chosen = ("noising", "denoising") if directions == "both" else (directions,)
    started = time.perf_counter()
    result = patch_every_head(handle, data, chosen, rows_per_pass, progress("patching"), ctx.budget)
    out["patching_seconds"] = time.perf_counter() - started
    out["forward_passes"] = float(result.forward_passes)
    out["attribution"] = attribution / gap
    for direction, effect in result.effects.items():
        out[f"{direction}_effect"] = effect / gap
    out["importance"] = torch.stack([e.abs() / abs(gap) for e in result.effects.values()]).amax(0)
    if "noising" in result.effects:
        from scipy.stats import spearmanr

        rho = spearmanr(attribution.flatten(), result.effects["noising"].flatten()).statistic
        out["attribution_spearman"] = float(rho)
    return out
