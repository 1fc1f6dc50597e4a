"""kv-cache-plan: a per-KV-head full/streaming plan from head roles, and its evaluation.

Each KV head either keeps the full cache or streams (its first `sink` tokens and
its `window` most recent ones, optionally with RazorAttention's compensation
token). Which heads stay full comes from a score, chosen by `method`:

- `retrieval`: the retrieval score (Wu et al.) of an earlier retrieval-heads run
  (`from_run`) or of a fresh one scored in this run;
- `razor`: RazorAttention's rule on head-detector's scores: the top
  `razor_induction` of heads by induction score and the top `razor_echo` by echo
  (duplicate-token) score;
- `duo`: DuoAttention's gates, trained in this run (`duo.py`);
- `random`: a seeded random ranking (a control; it needs a budget).

Query-head scores are pooled over each KV head's group (`pooling`, max by default).
The plan keeps `budget` KV heads full, or as many as fit in `budget_fraction` of
the full cache at `context_length`; with neither, each method's own rule decides
(retrieval heads score above 0.1, RazorAttention's fractions, DuoAttention's gates
above 0.5).

The evaluation runs out of sample, on the held-out needles and haystack text of
this family (`data/heldout/`, never used for retrieval scores): needle accuracy
(ROUGE-1 recall of the answer) and perplexity of the last `ppl_tokens` tokens of
long neutral prose, at each of `eval_lengths`, for the full cache, all-streaming
(StreamingLLM), the chosen plan (`eval_plan`), and at each budget of `eval_budgets` (fractions
of the full cache) the method's plan and a random plan with as many full heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from headscope.core.analysis import Analysis, Artifact, Finding, RunContext
from headscope.core.budget import run_batched
from headscope.core.errors import ContextTooLongError, InvalidParamsError, param_error
from headscope.core.plots import line_plot
from headscope.core.runs import MAX_INT
from headscope.core.tracing import forward, generate, make_batch, stop_token_ids

from .analysis import RetrievalHeads, rouge1_recall
from .kv_plan import (
    KVPlan,
    cached_tokens,
    full_cache_bytes,
    full_heads_for_budget,
    kv_cache_bytes,
    make_plan,
    plannable_heads,
    pool_kv_scores,
    random_kv_mask,
    razor_scores,
    top_kv_mask,
)
from .needles import (
    HaystackBuilder,
    NeedleTest,
    check_disjoint,
    heldout_haystack_paths,
    heldout_needles_path,
    load_haystack,
    load_needles,
    resolve_template,
)

PLAN_JSON = "kv_plan.json"
PLAN_TSV = "kv_plan.tsv"
Method = Literal["retrieval", "razor", "duo", "random"]
#: the head-detector scores RazorAttention's rule reads
RAZOR_METRICS = {"induction": "induction", "echo": "duplicate_token"}
#: a method's own rule when no budget is given: KV heads scoring above this are full
#: (retrieval heads score above 0.1; razor_scores puts the paper's set above 1/2;
#: DuoAttention keeps the heads whose gate stays above 0.5)
RULE_THRESHOLDS = {"retrieval": RetrievalHeads.head_selection[1], "razor": 0.5, "duo": 0.5}


class KVPlanParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Method = Field(
        "retrieval",
        description="Head score the plan is chosen from: retrieval (retrieval-heads), razor "
        "(RazorAttention's induction and echo heads, from head-detector), duo "
        "(DuoAttention's trained gates) or random (a control; needs a budget).",
    )
    from_run: int | None = Field(
        None,
        ge=1,
        le=MAX_INT,
        description="Take the scores from this run (retrieval-heads for retrieval, "
        "head-detector for razor, an earlier duo kv-cache-plan run for its gates) instead "
        "of scoring heads in this run.",
    )
    score_params: dict[str, Any] = Field(
        default_factory=dict,
        description="Params of the scoring run made here without from_run "
        "(retrieval-heads or head-detector; their defaults otherwise).",
    )
    pooling: Literal["max", "mean"] = Field(
        "max", description="How a KV head's score combines its query heads' scores."
    )
    razor_induction: float = Field(
        0.14, ge=0, le=1, description="razor: fraction of heads kept for induction."
    )
    razor_echo: float = Field(0.01, ge=0, le=1, description="razor: fraction kept for echo.")
    duo: dict[str, Any] = Field(
        default_factory=dict, description="duo: gate training settings (steps, length, ...)."
    )
    budget: int | None = Field(
        None, ge=0, le=MAX_INT, description="KV heads that keep the full cache."
    )
    budget_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Or: the share of the full KV cache the plan may keep at context_length.",
    )
    context_length: int | None = Field(
        None,
        ge=1,
        le=MAX_INT,
        description="Context length budget_fraction refers to (default: the longest eval length).",
    )
    sink: int = Field(64, ge=0, le=MAX_INT, description="Sink tokens a streaming head keeps.")
    window: int = Field(
        256, ge=1, le=MAX_INT, description="Recent tokens a streaming head keeps (itself included)."
    )
    compensate: bool = Field(
        False, description="Add RazorAttention's compensation token to streaming heads."
    )
    eval_lengths: list[int] = Field(
        [2000], description="Context lengths (tokens) of the evaluation; up to the model's maximum."
    )
    eval_depths: list[float] = Field(
        [50], description="Needle depths of the evaluation, percent of the haystack."
    )
    eval_budgets: list[float] = Field(
        [0.1, 0.2, 0.3, 0.5],
        description="Budgets swept in the evaluation, as fractions of the full KV cache "
        "([] evaluates the chosen plan only).",
    )
    eval_plan: bool = Field(
        True,
        description="Also evaluate the chosen plan and a random plan with as many full heads "
        "at each eval length (false: the budget sweep only).",
    )
    random_draws: int = Field(
        1, ge=1, le=20, description="Random plans per budget (accuracies are averaged)."
    )
    heldout_needles_file: str | None = Field(
        None, description="JSONL of evaluation needles (default: the built-in held-out set)."
    )
    heldout_haystack_files: list[str] | None = Field(
        None, description="Evaluation haystack text files (default: the built-in held-out set)."
    )
    template: str = Field("answer-prefix", description="Prompt template (as retrieval-heads).")
    max_new_tokens: int = Field(24, ge=1, le=512, description="Decoding steps per needle test.")
    ppl_tokens: int = Field(
        256,
        ge=0,
        le=MAX_INT,
        description="Perplexity over this many tokens at the end of each eval length of "
        "neutral prose (0 skips perplexity).",
    )

    @field_validator("eval_lengths")
    @classmethod
    def _lengths(cls, value: list[int]) -> list[int]:
        if not value or any(v < 1 for v in value):
            raise ValueError("give at least one positive length")
        return sorted(set(value))

    @field_validator("eval_depths")
    @classmethod
    def _depths(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 <= v <= 100 for v in value):
            raise ValueError("give at least one depth, each within 0-100 (percent)")
        return value

    @field_validator("eval_budgets")
    @classmethod
    def _budgets(cls, value: list[float]) -> list[float]:
        if any(not 0 <= v <= 1 for v in value):
            raise ValueError("budgets are fractions of the full KV cache, within 0-1")
        return sorted(set(value))

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        resolve_template(value)
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.budget is not None and self.budget_fraction is not None:
            raise ValueError("give budget or budget_fraction, not both")
        if self.method == "random" and self.budget is None and self.budget_fraction is None:
            raise ValueError("method random needs budget or budget_fraction")
        if self.from_run is not None and self.method == "random":
            raise ValueError("method random draws its heads: from_run does not apply")
        if self.from_run is not None and self.duo:
            raise ValueError("duo settings train gates here, not with from_run")
        if self.score_params and self.method not in ("retrieval", "razor"):
            raise ValueError(f"method {self.method} has no scoring run: score_params do not apply")
        if self.from_run is not None and self.score_params:
            raise ValueError("score_params apply to a scoring run made here, not with from_run")
        if self.duo and self.method != "duo":
            raise ValueError("duo settings apply to method duo only")
        kept = self.sink + self.window
        shortest = min(self.eval_lengths)
        if kept >= shortest:
            raise ValueError(
                f"sink + window = {kept} tokens is not smaller than the context "
                f"(eval length {shortest}): a streaming head would keep every token"
            )
        if self.context_length is not None and kept >= self.context_length:
            raise ValueError(
                f"sink + window = {kept} tokens is not smaller than context_length "
                f"{self.context_length}"
            )
        return self

    @property
    def budget_length(self) -> int:
        """The context length budget_fraction applies to."""
        return self.context_length or max(self.eval_lengths)


@dataclass
class _Setting:
    """One row of the evaluation: a plan (or several random draws) at one length."""

    label: str
    length: int
    kind: str  # full, streaming, plan, plan-random, <method>, random
    budget: float | None
    plans: list[KVPlan]
    accuracy: list[float] = field(default_factory=list)
    perplexity: list[float] = field(default_factory=list)
    responses: list[list[dict]] = field(default_factory=list)  # per plan, per test


class KVCachePlan(Analysis):
    name = "kv-cache-plan"
    version = "1"
    summary = "Full or streaming KV cache per KV head from head roles, evaluated on long needles."
    Params = KVPlanParams
    primary_metric = "kv_score"
    head_selection = ("threshold", 0.5)

    # -- checks ---------------------------------------------------------------------------
    @classmethod
    def check(cls, params: KVPlanParams, handle, registry) -> None:
        longest = max(params.eval_lengths)
        if longest + params.max_new_tokens > handle.max_positions:
            raise ContextTooLongError(
                f"eval length {longest} plus {params.max_new_tokens} generated tokens exceeds "
                f"{handle.name}'s {handle.max_positions} positions"
            )
        if params.budget_length > handle.max_positions:
            raise ContextTooLongError(
                f"context_length {params.budget_length} exceeds {handle.name}'s "
                f"{handle.max_positions} positions"
            )
        total = int(cls._plannable(handle).sum())
        if total == 0:
            raise param_error(
                "method",
                f"every layer of {handle.name} attends through its own sliding window: "
                "there is no full cache to plan",
            )
        if params.budget is not None and params.budget > total:
            raise param_error(
                "budget",
                f"{params.budget} full KV heads is more than {handle.name}'s {total} KV heads "
                f"that keep a full cache ({handle.n_layers} layers x {handle.n_kv_heads}"
                + (
                    ", less its sliding-window layers)"
                    if total < handle.n_layers * handle.n_kv_heads
                    else ")"
                ),
            )
        if params.budget_fraction is not None:
            cls._full_heads(params, handle)  # below what streaming alone keeps: an error
        needles, documents = cls._eval_inputs(params)
        builder = HaystackBuilder(handle.tokenizer, documents, resolve_template(params.template))
        for needle in needles:  # fails early if a needle cannot fit
            builder.build(needle, min(params.eval_lengths), params.eval_depths[0])
        if params.ppl_tokens:
            if params.ppl_tokens >= min(params.eval_lengths):
                raise param_error(
                    "ppl_tokens",
                    f"{params.ppl_tokens} scored tokens leave no context in eval length "
                    f"{min(params.eval_lengths)}",
                )
            available = len(cls._prose_ids(handle, params))
            if available < longest:
                raise param_error(
                    "eval_lengths",
                    f"the neutral prose for perplexity is {available} tokens, shorter than "
                    f"{longest}; give longer heldout_haystack_files or ppl_tokens=0",
                )
        if params.from_run is None and params.method in ("retrieval", "razor"):
            scorer = cls._scorer(params, registry)
            scorer.check(scorer.parse_params(cls._score_params(params)), handle, registry)
        if params.method == "duo" and params.from_run is None:
            cls._duo_settings(params)

    @classmethod
    def check_runs(cls, params: KVPlanParams, findings, model: str) -> None:
        if params.from_run is None:
            return
        run = findings.require_run(params.from_run, "from_run")
        if run.model != model:
            raise param_error(
                "from_run", f"run {run.id} is on {run.model}, not {model}: scores do not transfer"
            )
        if params.method == "duo" and (run.analysis, run.params.get("method")) != (
            cls.name,
            "duo",
        ):
            raise param_error(
                "from_run", f"run {run.id} is a {run.analysis} run, not a kv-cache-plan duo run"
            )
        if run.status == "succeeded":
            for metric in cls._score_metrics(params):
                findings.head_scores(params.from_run, metric)
        if run.analysis == RetrievalHeads.name:
            # the evaluation's needles must be ones the scores never saw
            theirs = RetrievalHeads.Params.model_validate(
                {k: v for k, v in run.params.items() if k in RetrievalHeads.Params.model_fields}
            )
            scored = (
                load_needles(Path(theirs.needles_file) if theirs.needles_file else None),
                load_haystack([Path(p) for p in theirs.haystack_files or []] or None),
            )
            check_disjoint(scored, cls._eval_inputs(params))

    @staticmethod
    def _score_metrics(params: KVPlanParams) -> list[str]:
        if params.method == "razor":
            return list(RAZOR_METRICS.values())
        if params.method == "duo":
            return ["kv_score"]  # the gates, per KV head
        return ["retrieval_score"]

    @staticmethod
    def _scorer(params: KVPlanParams, registry) -> type[Analysis]:
        if params.method == "razor":
            if registry is None:
                raise InvalidParamsError("method razor needs the head-detector analysis")
            return registry.analysis("head-detector")
        return RetrievalHeads

    @staticmethod
    def _score_params(params: KVPlanParams) -> dict[str, Any]:
        if params.method == "retrieval":  # its masking check does not change the scores
            return {"mask_top_k": [], **params.score_params}
        return dict(params.score_params)

    @staticmethod
    def _duo_settings(params: KVPlanParams):
        try:
            from .duo import DuoSettings
        except ImportError:
            raise param_error("method", "duo is not available in this installation") from None
        try:
            return DuoSettings(**params.duo)
        except ValueError as error:
            raise param_error("duo", str(error)) from None

    @staticmethod
    def _eval_inputs(params: KVPlanParams) -> tuple[list, list[str]]:
        needles = load_needles(
            Path(params.heldout_needles_file)
            if params.heldout_needles_file
            else heldout_needles_path()
        )
        documents = load_haystack(
            [Path(p) for p in params.heldout_haystack_files]
            if params.heldout_haystack_files
            else heldout_haystack_paths()
        )
        return needles, documents

    @classmethod
    def _prose_ids(cls, handle, params: KVPlanParams) -> list[int]:
        """Long neutral prose for perplexity: the evaluation's haystack documents, then
        the scoring corpus, each once (repeated text would reward copying)."""
        _, documents = cls._eval_inputs(params)
        extra = [d for d in load_haystack() if d not in documents]
        return handle.encode("\n\n".join(documents + extra))

    @staticmethod
    def _layer_windows(handle) -> tuple[int | None, ...]:
        """The model's own sliding window per layer (None: full attention)."""
        return tuple(handle.adapter.sliding_window(layer) for layer in range(handle.n_layers))

    @classmethod
    def _plannable(cls, handle) -> torch.Tensor:
        return plannable_heads(handle.n_kv_heads, cls._layer_windows(handle))

    @classmethod
    def _full_heads(cls, params: KVPlanParams, handle, fraction: float | None = None, length=None):
        total = int(cls._plannable(handle).sum())
        if fraction is None and params.budget is not None:
            return full_heads_for_budget(total, budget=params.budget)
        length = length or params.budget_length
        sliding = [w for w in cls._layer_windows(handle) if w is not None]
        return full_heads_for_budget(
            total,
            budget_fraction=params.budget_fraction if fraction is None else fraction,
            context_length=length,
            sink=params.sink,
            window=params.window,
            compensate=params.compensate,
            fixed_tokens=handle.n_kv_heads * sum(cached_tokens(length, w) for w in sliding),
        )

    # -- the run --------------------------------------------------------------------------
    def run(self, ctx: RunContext, params: KVPlanParams) -> Finding:
        handle = ctx.model
        self.check(params, handle, ctx.registry)
        finding = Finding()
        kv_scores = self._kv_scores(ctx, params, finding)
        shape = (handle.n_layers, handle.n_kv_heads)
        if params.budget is not None or params.budget_fraction is not None:
            k = self._full_heads(params, handle)
        else:  # the method's own rule
            k = int((kv_scores > RULE_THRESHOLDS[params.method]).sum())
        mask = top_kv_mask(kv_scores, k, self._plannable(handle))
        plan = self._plan(handle, params, mask, params.method, kv_scores)
        finding.add_head_scores("kv_score", kv_scores)
        finding.add_head_scores("kv_full", plan.mask().double())
        finding.add_metric("plan_full_heads", plan.full_heads)
        finding.add_metric("plan_full_fraction", plan.full_heads / (shape[0] * shape[1]))
        finding.artifacts.extend(plan_artifacts(plan))

        settings, skipped = self._settings(ctx, params, handle, plan, kv_scores)
        self._evaluate(ctx, params, handle, settings)
        self._report(finding, params, handle, plan, settings, skipped)
        ctx.progress(1, 1, "done")
        return finding

    def _kv_scores(self, ctx: RunContext, params: KVPlanParams, finding: Finding) -> torch.Tensor:
        """The per-KV-head score [layers, KV heads] the method ranks heads by."""
        handle = ctx.model
        if params.method == "random":
            return torch.from_numpy(ctx.rng.random((handle.n_layers, handle.n_kv_heads)))
        if params.method == "duo" and params.from_run is not None:
            finding.add_metric("scores_from_run", params.from_run)
            table = ctx.findings.head_scores(params.from_run, "kv_score")
            gates = torch.zeros(handle.n_layers, handle.n_kv_heads, dtype=torch.float64)
            for (layer, head), value in table.items():
                gates[layer, head] = value
            return gates
        if params.method == "duo":
            from .duo import train_gates

            ctx.progress(0, None, "training DuoAttention gates")
            gates = train_gates(
                handle,
                self._duo_settings(params),
                ctx.rng,
                lambda done, total: ctx.progress(done, total, f"duo gates: step {done}/{total}"),
            )
            return gates.detach().double().cpu()
        scores = self._query_scores(ctx, params, finding)
        if params.method == "razor":
            induction, echo = (scores[RAZOR_METRICS[k]] for k in ("induction", "echo"))
            query = razor_scores(induction, echo, params.razor_induction, params.razor_echo)
        else:
            query = scores["retrieval_score"]
        for name, values in scores.items():
            finding.add_metric(f"max_{name}", float(values.max()))
        return pool_kv_scores(query, handle.n_kv_heads, params.pooling)

    def _query_scores(self, ctx, params: KVPlanParams, finding) -> dict[str, torch.Tensor]:
        """Per-query-head scores [layers, heads] from `from_run` or a fresh scoring run."""
        handle = ctx.model
        metrics = self._score_metrics(params)
        if params.from_run is not None:
            finding.add_metric("scores_from_run", params.from_run)
            tables = {m: ctx.findings.head_scores(params.from_run, m) for m in metrics}
        else:
            scorer = self._scorer(params, ctx.registry)
            ctx.progress(0, None, f"scoring heads with {scorer.name}")
            scored = scorer().run(ctx, scorer.parse_params(self._score_params(params)))
            tables = {
                m: {
                    (layer, head): value
                    for layer, head, name, value in scored.head_scores
                    if name == m
                }
                for m in metrics
            }
        out = {}
        for metric, table in tables.items():
            values = torch.zeros(handle.n_layers, handle.n_heads, dtype=torch.float64)
            if set(table) != set(handle.heads()):
                raise InvalidParamsError(
                    f"the {metric} scores do not cover {handle.name}'s {handle.n_layers} layers "
                    f"x {handle.n_heads} heads"
                )
            for (layer, head), value in table.items():
                values[layer, head] = value
            out[metric] = values
        return out

    @classmethod
    def _plan(cls, handle, params, mask, method, scores=None) -> KVPlan:
        return make_plan(
            handle.name,
            mask,
            params.sink,
            params.window,
            params.compensate,
            method,
            scores,
            cls._layer_windows(handle),
        )

    def _settings(self, ctx, params, handle, plan, kv_scores) -> tuple[list[_Setting], list[str]]:
        shape = (handle.n_layers, handle.n_kv_heads)
        plannable = self._plannable(handle)
        full = torch.ones(shape, dtype=torch.bool)
        none = ~plannable  # sliding-window layers keep their own window
        settings, skipped = [], []

        def randoms(k: int) -> list[KVPlan]:
            return [
                self._plan(handle, params, random_kv_mask(shape, k, ctx.rng, plannable), "random")
                for _ in range(params.random_draws)
            ]

        for length in params.eval_lengths:
            settings.append(
                _Setting(
                    f"full_{length}",
                    length,
                    "full",
                    1.0,
                    [self._plan(handle, params, full, "full")],
                )
            )
            settings.append(
                _Setting(
                    f"streaming_{length}",
                    length,
                    "streaming",
                    None,
                    [self._plan(handle, params, none, "streaming")],
                )
            )
            if params.eval_plan:
                settings.append(_Setting(f"plan_{length}", length, "plan", None, [plan]))
                settings.append(
                    _Setting(
                        f"plan_random_{length}",
                        length,
                        "plan-random",
                        None,
                        randoms(int((plan.mask() & plannable).sum())),
                    )
                )
            for budget in params.eval_budgets:
                try:
                    k = self._full_heads(params, handle, budget, length)
                except InvalidParamsError:  # below what streaming alone keeps here
                    skipped.append(f"{budget:g} at {length} tokens")
                    continue
                name = _budget_name(budget)
                mask = top_kv_mask(kv_scores, k, plannable)
                settings.append(
                    _Setting(
                        f"{params.method}_{name}_{length}",
                        length,
                        params.method,
                        budget,
                        [self._plan(handle, params, mask, params.method, kv_scores)],
                    )
                )
                settings.append(
                    _Setting(f"random_{name}_{length}", length, "random", budget, randoms(k))
                )
        return settings, skipped

    # -- evaluation -----------------------------------------------------------------------
    def _evaluate(self, ctx, params: KVPlanParams, handle, settings: list[_Setting]) -> None:
        needles, documents = self._eval_inputs(params)
        builder = HaystackBuilder(handle.tokenizer, documents, resolve_template(params.template))
        tests = {
            length: [
                builder.build(needle, length, depth, index)
                for depth in params.eval_depths
                for index, needle in enumerate(needles)
            ]
            for length in params.eval_lengths
        }
        prose = self._prose_ids(handle, params) if params.ppl_tokens else []
        stops = stop_token_ids(handle, stop_at_newline=True)
        # identical plans at one length (e.g. a budget that keeps every head) run once
        distinct: dict[tuple[int, tuple], KVPlan] = {}
        for setting in settings:
            for plan in setting.plans:
                distinct.setdefault((setting.length, plan.full), plan)
        per_plan = max(len(t) for t in tests.values()) + (1 if params.ppl_tokens else 0)
        total = len(distinct) * per_plan
        results: dict[tuple[int, tuple], tuple[float, float]] = {}
        records: dict[tuple[int, tuple], list[dict]] = {}
        for index, ((length, key), plan) in enumerate(distinct.items()):
            done = index * per_plan
            label = f"{length} tokens, {plan.full_heads} full KV heads ({plan.method})"
            ctx.progress(done, total, label)
            items = [plan.intervention()] if plan.streaming_heads() else []
            responses = run_batched(
                handle,
                tests[length],
                lambda group, items=items: self._generate(handle, group, params, stops, items),
                tokens=lambda test: len(test.prompt_ids) + params.max_new_tokens,
                budget=ctx.budget,
                progress=lambda finished, _, done=done, label=label: ctx.progress(
                    done + finished, total, label
                ),
            )
            rouges = [
                rouge1_recall(t.needle.answer, r)
                for t, r in zip(tests[length], responses, strict=True)
            ]
            accuracy = float(np.mean(rouges))
            records[(length, key)] = [
                {
                    "needle": test.needle_index,
                    "depth": test.depth,
                    "answer": test.needle.answer,
                    "response": response,
                    "rouge1_recall": round(rouge, 4),
                }
                for test, response, rouge in zip(tests[length], responses, rouges, strict=True)
            ]
            ppl = (
                perplexity(handle, prose[:length], params.ppl_tokens, items)
                if params.ppl_tokens
                else float("nan")
            )
            results[(length, key)] = (accuracy, ppl)
        for setting in settings:
            for plan in setting.plans:
                accuracy, ppl = results[(setting.length, plan.full)]
                setting.accuracy.append(accuracy)
                setting.perplexity.append(ppl)
                setting.responses.append(records[(setting.length, plan.full)])

    @staticmethod
    def _generate(handle, tests: list[NeedleTest], params, stops, items) -> list[str]:
        batch = make_batch(handle, [test.prompt_ids for test in tests])
        result = generate(handle, batch, params.max_new_tokens, items, stop_ids=stops)
        return [handle.decode(tokens).strip() for tokens in result.tokens]

    # -- reporting ------------------------------------------------------------------------
    def _report(self, finding, params, handle, plan, settings, skipped) -> None:
        dtype, head_dim = handle.dtype, handle.head_dim
        rows = []
        for setting in settings:
            first = setting.plans[0]
            kv = kv_cache_bytes(first, setting.length, dtype, head_dim)
            whole = full_cache_bytes(
                first.n_layers,
                first.n_kv_heads,
                setting.length,
                dtype,
                head_dim,
                first.layer_windows,
            )
            values = {
                "needle_accuracy": float(np.mean(setting.accuracy)),
                "perplexity": float(np.mean(setting.perplexity)),
                "full_heads": first.full_heads,
                "kv_bytes": kv,
                "kv_fraction": kv / whole,
            }
            for name, value in values.items():
                if not (name == "perplexity" and not params.ppl_tokens):
                    finding.add_metric(f"{setting.label}.{name}", value)
            rows.append(
                {
                    "setting": setting.label,
                    "tokens": setting.length,
                    "plan": setting.kind,
                    "budget": "" if setting.budget is None else f"{setting.budget:g}",
                    "full KV heads": first.full_heads,
                    "KV cache": round(values["kv_fraction"], 3),
                    "KV MiB": round(kv / 2**20, 2),
                    "needle acc": round(values["needle_accuracy"], 3),
                    "ppl": round(values["perplexity"], 3) if params.ppl_tokens else "",
                }
            )
        finding.summary.setdefault("tables", {})["evaluation (held-out needles)"] = rows
        finding.add_json(
            "tests.json",
            [
                {"setting": s.label, "draw": draw, "full_heads": plan.full_heads, "tests": tests}
                for s in settings
                for draw, (plan, tests) in enumerate(zip(s.plans, s.responses, strict=True))
            ],
            "each setting's responses to the held-out needle tests",
        )
        finding.summary["plan"] = {
            "method": plan.method,
            "full KV heads": f"{plan.full_heads} of {plan.n_layers * plan.n_kv_heads}",
            "sink": plan.sink,
            "window": plan.window,
            "compensate": plan.compensate,
        }
        if skipped:
            finding.summary["budgets skipped (below all-streaming)"] = skipped
        self._smallest_budgets(finding, params, settings)
        finding.add_figure(
            "kv_plan_accuracy.png",
            _accuracy_figure(params.method, settings, handle.name),
            "needle accuracy against the KV cache kept, per method",
        )

    @staticmethod
    def _smallest_budgets(finding, params, settings: list[_Setting]) -> None:
        """Per length: the smallest swept budget whose plan keeps 90% of the full-cache
        accuracy, with the random and all-streaming accuracies there."""
        rows = []
        for length in params.eval_lengths:
            here = {s.label: s for s in settings if s.length == length}
            full = float(np.mean(here[f"full_{length}"].accuracy))
            streaming = float(np.mean(here[f"streaming_{length}"].accuracy))
            swept = sorted(
                (s for s in here.values() if s.kind == params.method and s.budget is not None),
                key=lambda s: s.budget,
            )
            # with no needle found by the full cache there is nothing to keep 90% of
            found = next((s for s in swept if full > 0 and np.mean(s.accuracy) >= 0.9 * full), None)
            row = {
                "tokens": length,
                "full acc": round(full, 3),
                "streaming acc": round(streaming, 3),
            }
            if found is None:
                none = "full cache finds no needle" if full == 0 else "none swept"
                row.update({"smallest budget": none, f"{params.method} acc": "", "random acc": ""})
            else:
                random = here[f"random_{_budget_name(found.budget)}_{length}"]
                finding.add_metric(f"min_budget_90pct_{length}", found.budget)
                row.update(
                    {
                        "smallest budget": f"{found.budget:g}",
                        f"{params.method} acc": round(float(np.mean(found.accuracy)), 3),
                        "random acc": round(float(np.mean(random.accuracy)), 3),
                    }
                )
            rows.append(row)
        title = f"smallest budget keeping 90% of full-cache accuracy ({params.method})"
        finding.summary.setdefault("tables", {})[title] = rows


def perplexity(handle, ids: list[int], scored: int, items) -> float:
    """exp(mean NLL) of the last `scored` tokens of `ids`, given everything before."""
    batch = make_batch(handle, [ids])
    positions = list(range(len(ids) - scored - 1, len(ids) - 1))
    logits = forward(handle, batch, items, logits_at=positions).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[len(ids) - scored :])
    return float(torch.exp(-logp[torch.arange(scored), targets].mean()))


def plan_artifacts(plan: KVPlan) -> list[Artifact]:
    """The plan as `kv_plan.json` and `kv_plan.tsv`, the files `runs export` hands out."""
    return [
        Artifact(PLAN_JSON, plan.to_json().encode(), "application/json", "the chosen plan (JSON)"),
        Artifact(
            PLAN_TSV,
            plan.to_tsv().encode(),
            "text/tab-separated-values",
            "the chosen plan as DuoAttention's full_attention_heads.tsv",
        ),
    ]


def _budget_name(budget: float) -> str:
    """0.3 -> b30, 0.125 -> b12p5: a setting name without dots."""
    return "b" + f"{budget * 100:g}".replace(".", "p")


def _accuracy_figure(method: str, settings: list[_Setting], model: str):
    series: dict[str, tuple[list[float], list[float]]] = {}
    lengths = sorted({s.length for s in settings})
    for setting in settings:
        if setting.kind not in (method, "random", "full", "streaming"):
            continue
        kind = {"full": "full cache", "streaming": "all streaming"}.get(setting.kind, setting.kind)
        label = kind if len(lengths) == 1 else f"{kind} ({setting.length} tokens)"
        first = setting.plans[0]
        fraction = kv_cache_bytes(first, setting.length, "float32", 1) / full_cache_bytes(
            first.n_layers, first.n_kv_heads, setting.length, "float32", 1, first.layer_windows
        )
        xs, ys = series.setdefault(label, ([], []))
        xs.append(fraction)
        ys.append(float(np.mean(setting.accuracy)))
    for xs, ys in series.values():
        order = np.argsort(xs)
        xs[:], ys[:] = [xs[i] for i in order], [ys[i] for i in order]
    return line_plot(
        series,
        f"KV-cache plans ({model})",
        "KV cache kept (fraction of full)",
        "needle accuracy (ROUGE-1 recall)",
    )
