"""attention-modulation: steer context-sensitive heads and measure faithfulness.

Heads are chosen on the calibration split (top-k or threshold on a
`context-heads` score computed now or taken from an earlier run, or an explicit
list); their attention to each example's context is amplified (PAINT form,
alpha * |z| on the context logits) or the rest of the prompt is down-weighted
(PASTA form), optionally with ACT-style sink calibration. The held-out split is
evaluated without and with the modulation, and, as controls at the same alpha,
with every head of the layer range and with as many random heads. Each setting
also gets the fluency guard: perplexity on neutral text.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from headscope.core.analysis import Analysis, Finding, RunContext
from headscope.core.runs import MAX_INT
from headscope.core.tracing import HeadMap, check_heads, head_map
from headscope.plugins.context.faithfulness import Evaluation, evaluate, perplexity
from headscope.plugins.context.sensitivity import METRICS, context_sensitivity

from .context_heads import DatasetParams, calibration_split
from .modulation import (
    Modulation,
    SteeringSettings,
    heads_by_score,
    layer_heads,
    layer_range,
)

# metric -> column of the summary table
SETTING_METRICS = {
    "faithful_prob": "faithful",
    "margin": "margin",
    "faithful_em": "exact",
    "memorised_em": "memorised",
    "perplexity": "ppl",
}


class ModulationParams(DatasetParams, SteeringSettings):
    selection: Literal["top_k", "threshold", "list", "all"] = Field(
        "top_k",
        description="top_k / threshold on `metric`, an explicit `heads` list, or all heads "
        "of the layer range.",
    )
    metric: str = Field(
        "answer_context_mass",
        description="Head score used by top_k and threshold: a context-heads metric, or "
        "with from_run any head metric of that run.",
    )
    top_k: int = Field(20, ge=1, le=10000, description="Heads to steer (selection=top_k).")
    threshold: float | None = Field(None, description="Score above which heads are steered.")
    heads: list[tuple[int, int]] | None = Field(None, description="[[layer, head], ...].")
    from_run: int | None = Field(
        None,
        ge=1,
        le=MAX_INT,
        description="Take head scores from this context-heads run instead of scoring now.",
    )
    controls: bool = Field(True, description="Also run all-heads and random-heads controls.")
    random_draws: int = Field(
        1, ge=1, le=20, description="Random head sets in the control (metrics are averaged)."
    )
    generate: bool = Field(True, description="Also score greedy answers (exact match).")
    max_new_tokens: int = Field(8, ge=1, le=64, description="Tokens per greedy answer.")
    calibration_tokens: int = Field(
        6, ge=2, le=64, description="Tokens generated per prompt for the lookback ratio."
    )

    @model_validator(mode="after")
    def _selection_inputs(self):
        if self.selection == "threshold" and self.threshold is None:
            raise ValueError("selection=threshold needs `threshold`")
        if self.selection == "list" and not self.heads:
            raise ValueError("selection=list needs `heads`: [[layer, head], ...]")
        if self.from_run is None and self.selection in ("top_k", "threshold"):
            if self.metric not in METRICS:
                raise ValueError(
                    f"metric {self.metric!r} is not a context-heads metric "
                    f"({', '.join(METRICS)}); other metrics need from_run"
                )
        return self


class AttentionModulation(Analysis):
    name = "attention-modulation"
    version = "1"
    summary = "Steer context-sensitive heads; faithfulness and perplexity vs controls."
    Params = ModulationParams
    primary_metric = "selected"

    @classmethod
    def check_runs(cls, params: ModulationParams, findings, model: str) -> None:
        if params.from_run is not None and params.selection in ("top_k", "threshold"):
            run = findings.require_run(params.from_run, "from_run")
            if run.status == "succeeded":
                findings.head_scores(params.from_run, params.metric)

    @classmethod
    def check(cls, params: ModulationParams, handle, registry) -> None:
        layer_range(handle, params.min_layer, params.max_layer)
        if params.heads:
            check_heads(handle, head_map(params.heads))
        calibration, held_out = calibration_split(params, 0)
        for example in calibration + held_out:
            handle.check_length(
                len(example.marked(handle)) + params.max_new_tokens, "an example prompt"
            )

    def run(self, ctx: RunContext, params: ModulationParams) -> Finding:
        handle = ctx.model
        calibration, held_out = calibration_split(params, ctx.seed)
        layers = layer_range(handle, params.min_layer, params.max_layer)
        finding = Finding()
        scores = self._scores(ctx, params, calibration)
        heads = self._select(params, scores, layers, handle)
        if scores is not None:
            finding.add_head_scores(params.metric, scores)
        selected = torch.zeros(handle.n_layers, handle.n_heads)
        for layer, hs in heads.items():
            selected[layer, list(hs)] = 1.0
        finding.add_head_scores("selected", selected)

        settings: list[Modulation | None] = [None, self._modulation(params, heads, "modulated")]
        if params.controls:
            n_heads = sum(len(hs) for hs in heads.values())
            pool = sorted((layer, h) for layer in layers for h in range(handle.n_heads))
            settings.append(self._modulation(params, layer_heads(handle, layers), "all_heads"))
            for draw in range(params.random_draws):
                picks = ctx.rng.choice(len(pool), size=min(n_heads, len(pool)), replace=False)
                random_heads = head_map([pool[int(i)] for i in sorted(picks)])
                label = "random_heads" if params.random_draws == 1 else f"random_heads_{draw + 1}"
                settings.append(self._modulation(params, random_heads, label))
        for setting in settings[1:]:
            setting.validate(handle)

        evaluations: list[Evaluation] = []
        for done, setting in enumerate(settings):
            label = setting.label if setting is not None else "baseline"
            ctx.progress(done, len(settings), f"evaluating {label}")
            result = evaluate(
                handle,
                held_out,
                setting,
                generate=params.generate,
                max_new_tokens=params.max_new_tokens,
                batch_size=params.batch_size,
                label=label,
            )
            result.metrics["perplexity"] = perplexity(handle, setting, batch_size=params.batch_size)
            evaluations.append(result)
        ctx.progress(len(settings), len(settings), "done")
        self._report(finding, params, heads, settings, evaluations, len(calibration))
        return finding

    # -- steps ---------------------------------------------------------------------
    @staticmethod
    def _scores(ctx, params, calibration) -> dict[tuple[int, int], float] | None:
        if params.selection in ("list", "all"):
            return None
        if params.from_run is not None:
            return ctx.findings.head_scores(params.from_run, params.metric)
        handle = ctx.model
        marked = [e.marked(handle) for e in calibration]
        computed = context_sensitivity(
            handle,
            marked,
            params.calibration_tokens,
            params.batch_size,
            progress=lambda done, total, message: ctx.progress(0, None, f"calibrating: {message}"),
        )
        matrix = computed[params.metric]
        return {
            (layer, head): float(matrix[layer, head])
            for layer in range(matrix.shape[0])
            for head in range(matrix.shape[1])
        }

    @staticmethod
    def _select(params, scores, layers, handle) -> HeadMap:
        if params.selection == "all":
            return layer_heads(handle, layers)
        if params.selection == "list":
            heads = head_map(params.heads)
            check_heads(handle, heads)
            return heads
        if params.selection == "top_k":
            return heads_by_score(scores, "top", params.top_k, layers)
        return heads_by_score(scores, "threshold", params.threshold, layers)

    @staticmethod
    def _modulation(params, heads: HeadMap, label: str) -> Modulation:
        return Modulation(heads, params.settings(), label)

    @staticmethod
    def _report(finding, params, heads, settings, evaluations, n_calibration) -> None:
        base = evaluations[0].metrics
        rows = []
        for setting, result in zip(settings, evaluations, strict=True):
            for name, value in result.metrics.items():
                finding.add_metric(f"{result.label}.{name}", value)
            row = {
                "setting": result.label,
                "heads": setting.n_heads if setting is not None else 0,
            }
            row.update(
                {
                    col: result.metrics[m]
                    for m, col in SETTING_METRICS.items()
                    if m in result.metrics
                }
            )
            if setting is not None:
                for m in ("faithful_prob", "faithful_em"):
                    if m in result.metrics:
                        finding.add_metric(f"{result.label}.gain_{m}", result.metrics[m] - base[m])
                finding.add_metric(
                    f"{result.label}.perplexity_change",
                    result.metrics["perplexity"] / base["perplexity"] - 1.0,
                )
            row["faithful gain"] = finding.metrics.get(f"{result.label}.gain_faithful_prob", 0.0)
            row["ppl change"] = finding.metrics.get(f"{result.label}.perplexity_change", 0.0)
            rows.append(row)
        draws = [r.metrics for r in evaluations if r.label.startswith("random_heads_")]
        if draws:  # the random control's mean over draws, named as for one draw
            for name in draws[0]:
                values = [d[name] for d in draws if name in d]
                finding.add_metric(f"random_heads.{name}", sum(values) / len(values))
            for m in ("faithful_prob", "faithful_em"):
                if m in draws[0]:
                    gain = finding.metrics[f"random_heads.{m}"] - base[m]
                    finding.add_metric(f"random_heads.gain_{m}", gain)
            change = finding.metrics["random_heads.perplexity"] / base["perplexity"] - 1.0
            finding.add_metric("random_heads.perplexity_change", change)
        finding.add_metric("selected_heads", settings[1].n_heads)
        finding.add_metric("calibration_examples", n_calibration)
        finding.add_metric("held_out_examples", base["examples"])
        finding.summary["tables"] = {"baseline vs modulated (held-out split)": rows}
        finding.summary["modulation"] = settings[1].describe()
        finding.add_json(
            "examples.json",
            {r.label: r.rows for r in evaluations},
            "per-example answers and log-probabilities for each setting",
        )
