"""attention-modulation: steer context-sensitive heads and measure faithfulness.

Heads are chosen on the calibration split (top-k or threshold on a
`context-heads` score computed now or taken from an earlier run, or an explicit
list); their attention to each example's context is amplified (PAINT form,
alpha * |z| on the context logits) or the rest of the prompt is down-weighted
(PASTA form), optionally with ACT-style sink calibration. The held-out split is
evaluated without and with the modulation, and, as controls at the same alpha,
with every head of the layer range and with random heads drawn layer by layer
(as many in each layer as were selected there, never a selected head). Each gain
comes with a paired bootstrap 95% interval over the held-out examples, and the
context heads' gain over the random heads' with its own interval. Each setting
also gets the fluency guard: perplexity on neutral text.

Heads taken from an earlier run (`from_run`) must have been chosen on examples
this run does not hold out: an overlap is rejected before the run starts.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from headscope.core import compare, stats
from headscope.core.analysis import Analysis, Finding, RunContext
from headscope.core.errors import InvalidParamsError, param_error
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
    "faithful_prob_per_token": "faithful/token",
    "margin": "margin",
    "faithful_em": "exact",
    "memorised_em": "memorised",
    "perplexity": "ppl",
}
# metric whose gain is reported -> the per-example outcome behind it (evaluate's rows)
GAIN_OUTCOMES = {
    "faithful_prob": "faithful",
    "faithful_prob_per_token": "faithful_per_token",
    "faithful_em": "faithful_em",
}
# analyses whose runs chose heads on a calibration split of these datasets
CALIBRATED_ANALYSES = ("context-heads", "attention-modulation")


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
    controls: bool = Field(
        True,
        description="Also run all-heads and layer-matched random-heads controls.",
    )
    random_draws: int = Field(
        3,
        ge=1,
        le=20,
        description="Layer-matched random head sets in the control (metrics are averaged).",
    )
    bootstrap: int = Field(
        2000, ge=100, le=100000, description="Bootstrap resamples for the 95% intervals."
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
    def check_held_out(cls, params: ModulationParams, findings, seed: int) -> None:
        if params.from_run is None or params.selection not in ("top_k", "threshold"):
            return
        run = findings.require_run(params.from_run, "from_run")
        if run.analysis not in CALIBRATED_ANALYSES:
            return  # its scores came from other data
        fields = {k: v for k, v in run.params.items() if k in DatasetParams.model_fields}
        theirs, _ = calibration_split(DatasetParams.model_validate(fields), run.seed)
        _, held_out = calibration_split(params, seed)
        seen = {e.group for e in theirs} & {e.group for e in held_out}
        if seen:
            raise param_error(
                "from_run",
                f"run {run.id} chose its heads on {len(seen)} of the groups this run holds "
                f"out (e.g. {sorted(seen)[0]}): its scores would be tested on their own "
                f"calibration data; use the seed ({run.seed}), dataset and n_examples of "
                f"run {run.id}, or score heads now without from_run",
            )

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
            settings.append(self._modulation(params, layer_heads(handle, layers), "all_heads"))
            if params.selection != "all":  # all heads leave none to draw
                chosen = [(layer, h) for layer, hs in heads.items() for h in hs]
                try:
                    for draw in range(params.random_draws):
                        control = compare.layer_matched_heads(
                            chosen, handle.n_heads, ctx.rng, layers
                        )
                        label = (
                            "random_heads"
                            if params.random_draws == 1
                            else f"random_heads_{draw + 1}"
                        )
                        settings.append(self._modulation(params, head_map(sorted(control)), label))
                except InvalidParamsError as error:  # too many heads selected to match
                    finding.summary["notes"] = [f"no random-heads control: {error}"]
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
                budget=ctx.budget,
            )
            result.metrics["perplexity"] = perplexity(
                handle, setting, batch_size=params.batch_size, budget=ctx.budget
            )
            evaluations.append(result)
        ctx.progress(len(settings), len(settings), "done")
        self._report(finding, params, settings, evaluations, len(calibration), ctx.seed)
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
            budget=ctx.budget,
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
    def _report(finding, params, settings, evaluations, n_calibration, seed) -> None:
        base = evaluations[0]
        draws = [r for r in evaluations if r.label.startswith("random_heads_")]
        if draws:  # the random control's mean over draws, named as for one draw
            mean = {
                name: sum(d.metrics[name] for d in draws) / len(draws) for name in draws[0].metrics
            }
            evaluations = [*evaluations, Evaluation("random_heads", mean, _mean_rows(draws))]
        by_label = {r.label: r for r in evaluations}
        rows = []
        for result in evaluations:
            for name, value in result.metrics.items():
                finding.add_metric(f"{result.label}.{name}", value)
            if result is base:
                continue
            for metric, outcome in GAIN_OUTCOMES.items():
                if metric in result.metrics:
                    _add_gain(
                        finding,
                        f"{result.label}.gain_{metric}",
                        result,
                        base,
                        outcome,
                        params,
                        seed,
                    )
            finding.add_metric(
                f"{result.label}.perplexity_change",
                result.metrics["perplexity"] / base.metrics["perplexity"] - 1.0,
            )
        random = by_label.get("random_heads")
        if random is not None:  # is the gain specific to the chosen heads?
            for metric, outcome in GAIN_OUTCOMES.items():
                if metric in random.metrics:
                    name = f"modulated.gain_over_random_{metric}"
                    _add_gain(finding, name, by_label["modulated"], random, outcome, params, seed)
        n_heads = {s.label: s.n_heads for s in settings if s is not None}
        n_heads["random_heads"] = settings[1].n_heads
        for result in evaluations:
            if result.label.startswith("random_heads_"):
                continue  # each draw's metrics are stored; the table shows their mean
            row = {"setting": result.label, "heads": n_heads.get(result.label, 0)}
            row.update(
                {
                    col: result.metrics[m]
                    for m, col in SETTING_METRICS.items()
                    if m in result.metrics
                }
            )
            for metric in ("faithful_prob", "faithful_prob_per_token"):
                key = f"{result.label}.gain_{metric}"
                column = "gain" if metric == "faithful_prob" else "gain/token"
                row[f"{column} [95% CI]"] = _interval_text(finding.metrics, key)
            row["ppl change"] = finding.metrics.get(f"{result.label}.perplexity_change", 0.0)
            rows.append(row)
        tables = {"baseline vs modulated (held-out split)": rows}
        if random is not None:
            tables["context heads minus layer-matched random heads"] = [
                {
                    "metric": metric,
                    "gain over random [95% CI]": _interval_text(
                        finding.metrics, f"modulated.gain_over_random_{metric}"
                    ),
                }
                for metric in GAIN_OUTCOMES
                if f"modulated.gain_over_random_{metric}" in finding.metrics
            ]
        finding.add_metric("selected_heads", settings[1].n_heads)
        if random is not None:  # 1: every draw has the selection's layer histogram
            wanted = compare.layer_histogram(_heads(settings[1]))
            exact = all(
                compare.layer_histogram(_heads(s)) == wanted
                for s in settings[2:]
                if s is not None and s.label.startswith("random_heads")
            )
            finding.add_metric("random_heads.layer_matched", float(exact))
        finding.add_metric("calibration_examples", n_calibration)
        finding.add_metric("held_out_examples", base.metrics["examples"])
        finding.summary["tables"] = tables
        finding.summary["modulation"] = settings[1].describe()
        finding.summary["controls"] = {
            s.label: s.describe()["heads"] for s in settings[2:] if s is not None
        }
        finding.add_json(
            "examples.json",
            {r.label: r.rows for r in evaluations},
            "per-example answers and log-probabilities for each setting",
        )


def _heads(setting: Modulation) -> list[tuple[int, int]]:
    return [(layer, h) for layer, hs in setting.heads.items() for h in hs]


def _mean_rows(draws: list[Evaluation]) -> list[dict]:
    """Per-example outcomes of the random control, averaged over its draws."""
    rows = []
    for i in range(len(draws[0].rows)):
        row = {}
        for outcome in GAIN_OUTCOMES.values():
            values = [d.rows[i][outcome] for d in draws if outcome in d.rows[i]]
            if values:
                row[outcome] = sum(float(v) for v in values) / len(values)
        rows.append(row)
    return rows


def _add_gain(finding, name, result, reference, outcome, params, seed) -> None:
    """`name` = mean paired difference of `outcome` (result minus reference) over the
    examples that have it, with `name`_low / `name`_high: its bootstrap 95% interval."""
    pairs = [
        float(a[outcome]) - float(b[outcome])
        for a, b in zip(result.rows, reference.rows, strict=True)
        if outcome in a and outcome in b
    ]
    if not pairs:
        return
    low, high = stats.bootstrap_interval(pairs, seed=seed, resamples=params.bootstrap)
    finding.add_metric(name, sum(pairs) / len(pairs))
    finding.add_metric(f"{name}_low", low)
    finding.add_metric(f"{name}_high", high)


def _interval_text(metrics: dict[str, float], name: str) -> str:
    """A gain and its interval in points, e.g. "+27.8 [+12.5, +41.7]"; "" if absent."""
    if name not in metrics:
        return ""
    gain, low, high = (100 * metrics[n] for n in (name, f"{name}_low", f"{name}_high"))
    return f"{gain:+.1f} [{low:+.1f}, {high:+.1f}]"
