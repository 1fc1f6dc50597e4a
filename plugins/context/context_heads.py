"""context-heads: how much each head attends to a marked context.

On the calibration split of a context-faithfulness dataset (built-in sets are
generated from the run seed; see `data`), every head gets three
scores (`sensitivity`): attention mass on the context from the rows
after it, the same from the answer row alone, and the Lookback-Lens ratio of
attention on the context to attention on generated tokens while answering.
`attention-modulation` can steer the top heads of such a run (`from_run`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from headscope.core.analysis import Analysis, Finding, RunContext, top_heads
from headscope.core.plots import head_heatmap
from headscope.plugins.context.data import load_dataset, split
from headscope.plugins.context.sensitivity import METRICS, context_sensitivity


class DatasetParams(BaseModel):
    """Which examples, and how they split into calibration and held-out parts."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        "counterfactual",
        description="counterfactual, key-value, proverbs, or a .jsonl file "
        "(context, question, answer, memory_answer, answer_prefix).",
    )
    n_examples: int = Field(48, ge=2, le=5000, description="Examples to draw or read.")
    calibration_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of examples (by fact) used to score heads."
    )
    batch_size: int = Field(
        8, ge=1, le=256, description="Prompts per pass at most (fewer when memory is short)."
    )


class ContextHeadsParams(DatasetParams):
    max_new_tokens: int = Field(
        6, ge=2, le=64, description="Tokens generated per prompt for the lookback ratio."
    )


def calibration_split(params: DatasetParams, seed: int):
    examples = load_dataset(params.dataset, params.n_examples, seed)
    return split(examples, params.calibration_fraction, seed)


class ContextHeads(Analysis):
    name = "context-heads"
    version = "1"
    summary = "Per-head attention on a marked context: context mass and lookback ratio."
    Params = ContextHeadsParams
    primary_metric = "answer_context_mass"
    head_selection = ("top", 45)

    @classmethod
    def check(cls, params: ContextHeadsParams, handle, registry) -> None:
        calibration, _ = calibration_split(params, 0)
        for example in calibration:
            marked = example.marked(handle)
            handle.check_length(len(marked) + params.max_new_tokens, "an example prompt")

    def run(self, ctx: RunContext, params: ContextHeadsParams) -> Finding:
        handle = ctx.model
        calibration, held_out = calibration_split(params, ctx.seed)
        marked = [e.marked(handle) for e in calibration]
        scores = context_sensitivity(
            handle,
            marked,
            params.max_new_tokens,
            params.batch_size,
            progress=ctx.progress,
            budget=ctx.budget,
        )
        finding = Finding()
        for metric in METRICS:
            finding.add_head_scores(metric, scores[metric])
            finding.add_metric(f"max_{metric}", float(scores[metric].max()))
            finding.summary.setdefault("top_heads", {})[metric] = top_heads(scores[metric], 10)
        finding.add_metric("calibration_examples", len(calibration))
        finding.add_metric("held_out_examples", len(held_out))
        figure = head_heatmap(
            scores[self.primary_metric].numpy(),
            f"{self.primary_metric} ({handle.name})",
            self.primary_metric,
        )
        finding.add_figure(f"{self.primary_metric}.png", figure, "context attention per head")
        return finding
