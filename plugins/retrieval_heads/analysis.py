"""retrieval-heads: Wu et al.'s retrieval score, with a causal masking check.

For each needle-in-a-haystack test the model decodes greedily. At every step,
for every query head, the argmax of the head's attention row (computed from q and
k for the current query only; no attention maps) is compared with the token just
emitted: the head copy-pastes when the argmax lies in the answer span and the
input token there equals the emitted token. A test's score for a head is
(copy-paste steps) / (answer span length), as in the published code (no
de-duplication). Tests count only when the response recalls the answer with
ROUGE-1 recall > 0.5 (lower-cased, alphanumeric tokens, Porter stemming).
A head's retrieval score is its mean over counted tests; retrieval heads score
above `threshold` (0.1).

The causal check masks the top-K heads (uniform attention: their queries zeroed
at the prefill and every decode step) and, separately, K heads drawn at random
from the heads that are *not* retrieval heads, and measures needle accuracy. By
default it runs out of sample: on held-out needles hidden in held-out haystack
text (`data/heldout/`), none of which the scores were computed from.

`compare_with=RUN` reports how far the retrieval heads are the heads another run
selects (e.g. head-detector's induction heads: is retrieval just copying?).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from headscope.core.analysis import Analysis, Finding, RunContext
from headscope.core.budget import MemoryBudget, run_batched
from headscope.core.compare import compare_head_sets, select_heads
from headscope.core.errors import ContextTooLongError, InvalidParamsError
from headscope.core.plots import head_heatmap, line_plot
from headscope.core.runs import MAX_INT
from headscope.core.tracing import (
    AttentionRows,
    UniformAttention,
    generate,
    head_map,
    make_batch,
    stop_token_ids,
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

_ROUGE = None


def rouge1_recall(answer: str, response: str) -> float:
    """ROUGE-1 recall of the answer in the response (rouge-score, Porter stemmer)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return float(_ROUGE.score(answer, response)["rouge1"].recall)


def copy_paste_scores(
    argmax: torch.Tensor, generated: list[int], prompt_ids: list[int], span: tuple[int, int]
) -> torch.Tensor:
    """Per-head retrieval score of one test: [layers, heads].

    argmax[t] ([layers, heads]) is each head's attention argmax (absolute position)
    for the query that produced generated[t].
    """
    start, end = span
    prompt = torch.tensor(prompt_ids)
    scores = torch.zeros(argmax.shape[1:], dtype=torch.float64)
    for step, token in enumerate(generated):
        position = argmax[step]
        in_span = (position >= start) & (position < end)
        safe = position.clamp(0, len(prompt_ids) - 1)
        copied = in_span & (prompt[safe] == token)
        scores += copied.double() / (end - start)
    return scores


def top_heads(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k best (layer, head) by score; ties broken by position, for determinism."""
    heads = scores.shape[1]
    order = torch.argsort(scores.flatten(), descending=True, stable=True)[:k]
    return [(int(i) // heads, int(i) % heads) for i in order]


def non_retrieval_heads(scores: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """Heads that are *not* retrieval heads (score <= threshold): the random pool."""
    layers, heads = scores.shape
    return [
        (layer, head)
        for layer in range(layers)
        for head in range(heads)
        if scores[layer, head] <= threshold
    ]


def draw_random_heads(
    rng: np.random.Generator, pool: list[tuple[int, int]], k: int
) -> list[tuple[int, int]]:
    """k distinct heads drawn uniformly from the pool (the non-retrieval heads)."""
    picks = rng.choice(len(pool), size=k, replace=False)
    return [pool[int(i)] for i in picks]


@dataclass
class NeedleOutcome:
    test: NeedleTest
    response: str
    rouge: float
    scores: torch.Tensor | None = None  # [layers, heads]; None when not scored
    tokens: list[int] = field(default_factory=list)
    split: str = "scoring"  # or "held-out": a masking-check test never scored

    @property
    def counted(self) -> bool:
        return self.rouge > 0.5

    def record(self) -> dict[str, Any]:
        return {
            "needle": self.test.needle_index,
            "length": self.test.length,
            "prompt_tokens": len(self.test.prompt_ids),
            "depth": self.test.depth,
            "answer": self.test.needle.answer,
            "response": self.response,
            "rouge1_recall": round(self.rouge, 4),
            "counted": self.counted,
            "split": self.split,
        }


class RetrievalParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lengths: list[int] = Field([500, 1000, 2000], description="Prompt lengths in tokens.")
    depths: list[float] = Field([10, 50, 90], description="Needle depths, percent of the haystack.")
    needles_file: str | None = Field(None, description="JSONL of needles (default: built-in).")
    haystack_files: list[str] | None = Field(
        None, description="Text files (default: built-in corpus)."
    )
    template: str = Field(
        "answer-prefix",
        description="Prompt template: answer-prefix (the answer begins with the needle's "
        "own words, as published), bare (the prompt ends at 'Answer:'), or one of your own "
        "with {context}, {question} and optionally {answer_prefix}.",
    )
    max_new_tokens: int = Field(
        32, ge=1, le=512, description="Decoding steps at most (stops at a newline)."
    )
    threshold: float = Field(0.1, ge=0, description="Retrieval heads score above this.")
    mask_top_k: list[int] = Field(
        [0, 5, 10, 20], description="K values for the masking check ([] skips it)."
    )
    mask_lengths: list[int] | None = Field(
        [500], description="Lengths used for the masking check (None: all)."
    )
    random_draws: int = Field(2, ge=1, le=50, description="Random head sets per test and K.")
    mask_on: Literal["held-out", "scoring"] = Field(
        "held-out",
        description="Masking-check tests: held-out = needles and haystack not used for "
        "scoring; scoring = the scored tests themselves.",
    )
    heldout_needles_file: str | None = Field(
        None, description="JSONL of held-out needles (default: built-in held-out set)."
    )
    heldout_haystack_files: list[str] | None = Field(
        None, description="Held-out haystack text files (default: built-in held-out set)."
    )
    compare_with: int | None = Field(
        None,
        ge=1,
        le=MAX_INT,
        description="Compare the retrieval heads with this run's heads (e.g. a head-detector "
        "run: its induction heads).",
    )
    scores_from: int | None = Field(
        None, ge=1, le=MAX_INT, description="Reuse retrieval scores from this run id."
    )

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one length")
        if any(v < 1 for v in value):
            raise ValueError("lengths must be positive")
        return value

    @field_validator("depths")
    @classmethod
    def _depths(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("give at least one depth")
        bad = [v for v in value if not 0 <= v <= 100]
        if bad:
            raise ValueError(f"depths must be within 0-100 (percent), got {bad}")
        return value

    @field_validator("mask_top_k")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        if any(v < 0 for v in value):
            raise ValueError("K must be >= 0")
        return sorted(set(value))

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        resolve_template(value)
        return value


@dataclass
class _Inputs:
    needles: list
    documents: list[str]
    mask_lengths: list[int] = field(default_factory=list)
    heldout_needles: list = field(default_factory=list)
    heldout_documents: list[str] = field(default_factory=list)


class RetrievalHeads(Analysis):
    name = "retrieval-heads"
    version = "2"
    summary = "Retrieval score per head on needle-in-a-haystack tests, with a masking check."
    Params = RetrievalParams
    primary_metric = "retrieval_score"
    head_selection = ("threshold", 0.1)

    @classmethod
    def check(cls, params: RetrievalParams, handle, registry) -> None:
        inputs = cls._inputs(params)
        too_long = [n for n in params.lengths if n + params.max_new_tokens > handle.max_positions]
        if too_long:
            raise ContextTooLongError(
                f"lengths {too_long} plus {params.max_new_tokens} generated tokens exceed "
                f"{handle.name}'s {handle.max_positions} positions"
            )
        template = resolve_template(params.template)
        builder = HaystackBuilder(handle.tokenizer, inputs.documents, template)
        shortest = min(params.lengths)
        for needle in inputs.needles:  # fails early if a needle cannot fit
            builder.build(needle, shortest, params.depths[0])
        heldout = HaystackBuilder(handle.tokenizer, inputs.heldout_documents or ["."], template)
        for needle in inputs.heldout_needles:
            heldout.build(needle, min(inputs.mask_lengths), params.depths[0])

    @classmethod
    def check_runs(cls, params: RetrievalParams, findings, model: str) -> None:
        if params.scores_from is not None:
            run = findings.require_run(params.scores_from, "scores_from")
            if run.status == "succeeded":
                findings.head_scores(params.scores_from, "retrieval_score")
        if params.compare_with is not None:
            run = findings.require_run(params.compare_with, "compare_with")
            if run.model != model:
                raise InvalidParamsError(
                    f"compare_with: run {run.id} is on {run.model}, not {model}"
                )

    @staticmethod
    def _inputs(params: RetrievalParams) -> _Inputs:
        needles = load_needles(Path(params.needles_file) if params.needles_file else None)
        documents = load_haystack(
            [Path(p) for p in params.haystack_files] if params.haystack_files else None
        )
        if params.mask_lengths is None:
            mask_lengths = list(params.lengths)
        else:
            mask_lengths = [
                n for n in params.mask_lengths if n in params.lengths
            ] or params.mask_lengths
        inputs = _Inputs(needles, documents, mask_lengths)
        if params.mask_on == "held-out" and params.mask_top_k:
            inputs.heldout_needles = load_needles(
                Path(params.heldout_needles_file)
                if params.heldout_needles_file
                else heldout_needles_path()
            )
            inputs.heldout_documents = load_haystack(
                [Path(p) for p in params.heldout_haystack_files]
                if params.heldout_haystack_files
                else heldout_haystack_paths()
            )
            check_disjoint((needles, documents), (inputs.heldout_needles, inputs.heldout_documents))
        return inputs

    def run(self, ctx: RunContext, params: RetrievalParams) -> Finding:
        handle = ctx.model
        self.check(params, handle, ctx.registry)
        inputs = self._inputs(params)
        template = resolve_template(params.template)
        builder = HaystackBuilder(handle.tokenizer, inputs.documents, template)
        stops = stop_token_ids(handle, stop_at_newline=True)
        tests = [
            builder.build(needle, length, depth, index)
            for length in params.lengths
            for depth in params.depths
            for index, needle in enumerate(inputs.needles)
        ]
        mask_tests = [t for t in tests if t.length in inputs.mask_lengths]
        if params.mask_on == "held-out":
            heldout = HaystackBuilder(handle.tokenizer, inputs.heldout_documents, template)
            mask_tests = [
                heldout.build(needle, length, depth, index)
                for length in inputs.mask_lengths
                for depth in params.depths
                for index, needle in enumerate(inputs.heldout_needles)
            ]
        elif not mask_tests and params.mask_top_k:
            mask_tests = [
                builder.build(needle, length, depth, index)
                for length in inputs.mask_lengths
                for depth in params.depths
                for index, needle in enumerate(inputs.needles)
            ]
        ks = [k for k in params.mask_top_k if k > 0]
        scoring = params.scores_from is None
        scored_ids = {id(t) for t in tests} if scoring else set()
        baselines = sum(id(t) not in scored_ids for t in mask_tests) if ks else 0
        total = len(scored_ids) + baselines + len(mask_tests) * len(ks) * (1 + params.random_draws)
        done = 0

        finding = Finding()
        n_layers, n_heads = handle.n_layers, handle.n_heads
        outcomes: dict[int, NeedleOutcome] = {}
        if scoring:
            scored = self._score_tests(
                handle, tests, params.max_new_tokens, stops, ctx.budget, done, total, ctx.progress
            )
            done += len(tests)
            outcomes.update((id(t), o) for t, o in zip(tests, scored, strict=True))
            scores = self._aggregate(finding, [outcomes[id(t)] for t in tests], handle, params)
        else:
            table = ctx.findings.head_scores(params.scores_from, "retrieval_score")
            scores = torch.zeros(n_layers, n_heads, dtype=torch.float64)
            for (layer, head), value in table.items():
                if layer >= n_layers or head >= n_heads:
                    raise InvalidParamsError(
                        f"run {params.scores_from} has scores for another model shape"
                    )
                scores[layer, head] = value
            finding.add_head_scores("retrieval_score", scores)
            finding.add_metric("scores_from_run", params.scores_from)
            self._head_summary(finding, scores, params.threshold, handle)

        if ks:
            self._masking(
                ctx, finding, handle, scores, mask_tests, outcomes, ks, params, stops, done, total
            )
            finding.summary["masking tests"] = params.mask_on
        if params.compare_with is not None:
            self._compare(ctx, finding, scores, params)
        ctx.progress(total, total, "done")
        finding.add_json(
            "tests.json", [o.record() for o in outcomes.values()], "per-test responses"
        )
        figure = head_heatmap(scores.numpy(), f"retrieval score ({handle.name})", "retrieval score")
        finding.add_figure("retrieval_score.png", figure, "retrieval score per head")
        return finding

    # -- scoring -------------------------------------------------------------------------
    @staticmethod
    def _generate(handle, tests: list[NeedleTest], max_new_tokens: int, stops, items=()):
        """One greedy generation over a left-padded batch of tests."""
        batch = make_batch(handle, [test.prompt_ids for test in tests])
        return batch, generate(handle, batch, max_new_tokens, list(items), stop_ids=stops)

    def _score_tests(
        self, handle, tests, max_new_tokens, stops, budget: MemoryBudget, done, total, progress
    ) -> list[NeedleOutcome]:
        """Score every test, as many per pass as the memory budget allows."""

        def report(finished: int, _: int) -> None:
            progress(done + finished, total, f"scoring: {finished}/{len(tests)} tests")

        progress(done, total, f"scoring {len(tests)} tests")
        return run_batched(
            handle,
            tests,
            lambda group: self._score_batch(handle, group, max_new_tokens, stops),
            tokens=lambda test: len(test.prompt_ids) + max_new_tokens,
            budget=budget,
            progress=report,
        )

    def _score_test(self, handle, test, max_new_tokens, stops) -> NeedleOutcome:
        return self._score_batch(handle, [test], max_new_tokens, stops)[0]

    def _score_batch(self, handle, tests, max_new_tokens, stops) -> list[NeedleOutcome]:
        layers = list(range(handle.n_layers))
        rows = AttentionRows(layers, positions=[-1], output="argmax")
        batch, result = self._generate(handle, tests, max_new_tokens, stops, [rows])
        outcomes = []
        for row, (test, pad) in enumerate(zip(tests, batch.pads, strict=True)):
            generated = result.tokens[row]
            # padded columns -> positions in this test's own prompt
            argmax = (
                torch.stack(
                    [
                        torch.stack(
                            [result.steps[t][("rows", layer)][row, :, 0] for layer in layers]
                        )
                        for t in range(len(generated))
                    ]
                )
                - pad
            )
            response = handle.decode(generated).strip()
            rouge = rouge1_recall(test.needle.answer, response)
            scores = copy_paste_scores(argmax, generated, test.prompt_ids, test.answer_span)
            outcomes.append(NeedleOutcome(test, response, rouge, scores, generated))
        return outcomes

    def _aggregate(
        self, finding: Finding, outcomes: list[NeedleOutcome], handle, params
    ) -> torch.Tensor:
        n_layers, n_heads = handle.n_layers, handle.n_heads
        counted = [o for o in outcomes if o.counted]
        if counted:
            stack = torch.stack([o.scores for o in counted])  # [tests, L, H]
            scores = stack.mean(0)
            frequency = (stack > 0).double().mean(0)
        else:
            scores = torch.zeros(n_layers, n_heads, dtype=torch.float64)
            frequency = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        finding.add_head_scores("retrieval_score", scores)
        finding.add_head_scores("activation_frequency", frequency)
        finding.add_metric("tests_run", len(outcomes))
        finding.add_metric("tests_counted", len(counted))
        finding.add_metric("needle_accuracy", float(np.mean([o.rouge for o in outcomes])))
        by_length: dict[int, list[float]] = {}
        for outcome in outcomes:
            by_length.setdefault(outcome.test.length, []).append(outcome.rouge)
        for length, values in sorted(by_length.items()):
            finding.add_metric(f"needle_accuracy_{length}", float(np.mean(values)))
        self._head_summary(finding, scores, params.threshold, handle)
        if not counted:
            finding.summary["warning"] = "no test passed the ROUGE-1 > 0.5 filter; all scores are 0"
        return scores

    @staticmethod
    def _head_summary(finding: Finding, scores: torch.Tensor, threshold: float, handle) -> None:
        # KV-cache plans work per key/value head: a KV head matters when any
        # query head in its group retrieves (head index = KV head below).
        groups = scores.view(handle.n_layers, handle.n_kv_heads, handle.adapter.group_size)
        finding.add_head_scores("kv_retrieval_score", groups.max(-1).values)
        flat = scores.flatten()
        finding.add_metric("fraction_above_threshold", float((flat > threshold).double().mean()))
        finding.add_metric("retrieval_heads", int((flat > threshold).sum()))
        finding.add_metric("fraction_zero", float((flat == 0).double().mean()))
        finding.add_metric("max_retrieval_score", float(flat.max()))

    # -- causal check ----------------------------------------------------------------------
    def _masking(
        self, ctx, finding, handle, scores, tests, outcomes, ks, params, stops, done, total
    ) -> None:
        ranked = top_heads(scores, len(scores.flatten()))
        non_retrieval = non_retrieval_heads(scores, params.threshold)
        too_big = [k for k in ks if k > len(non_retrieval)]
        if too_big:
            raise InvalidParamsError(
                f"mask_top_k {too_big} exceeds the {len(non_retrieval)} non-retrieval heads to draw random sets from"
            )
        # Every generation of the check, test by test: the unmasked baseline where
        # scoring did not run it, then each K's top-K and random-K variants. A test's
        # variants share its prompt, so they batch together as rows with per-row masks.
        split = "held-out" if params.mask_on == "held-out" else "scoring"
        draws_log = []
        variants: dict[int, list[tuple[int, str, dict]]] = {id(t): [] for t in tests}
        for test in tests:
            if id(test) not in outcomes:
                variants[id(test)].append((0, "baseline", {}))
        for k in ks:
            for test in tests:
                variants[id(test)].append((k, "top", head_map(ranked[:k])))
                for _ in range(params.random_draws):
                    drawn = draw_random_heads(ctx.rng, non_retrieval, k)
                    draws_log.append({"k": k, "heads": drawn})
                    variants[id(test)].append((k, "random", head_map(drawn)))
        jobs = [(test, *variant) for test in tests for variant in variants[id(test)]]

        def report(finished: int, _: int) -> None:
            ctx.progress(done + finished, total, f"masking: {finished}/{len(jobs)} generations")

        ctx.progress(done, total, f"masking check: {len(jobs)} generations")
        responses = run_batched(
            handle,
            jobs,
            lambda group: self._masked_batch(handle, group, params.max_new_tokens, stops),
            tokens=lambda job: len(job[0].prompt_ids) + params.max_new_tokens,
            budget=ctx.budget,
            progress=report,
        )
        accuracy: dict[tuple[int, str], list[float]] = {}
        for (test, k, kind, _), response in zip(jobs, responses, strict=True):
            rouge = rouge1_recall(test.needle.answer, response)
            if kind == "baseline":
                outcomes[id(test)] = NeedleOutcome(test, response, rouge, split=split)
            else:
                accuracy.setdefault((k, kind), []).append(rouge)
        baseline = [outcomes[id(test)].rouge for test in tests]
        rows = [
            {
                "k": 0,
                "top_k_accuracy": float(np.mean(baseline)),
                "random_k_accuracy": float(np.mean(baseline)),
            }
        ]
        for k in ks:
            rows.append(
                {
                    "k": k,
                    "top_k_accuracy": float(np.mean(accuracy[(k, "top")])),
                    "random_k_accuracy": float(np.mean(accuracy[(k, "random")])),
                }
            )
        for row in rows:
            finding.add_metric(f"mask_top_{row['k']}_accuracy", row["top_k_accuracy"])
            finding.add_metric(f"mask_random_{row['k']}_accuracy", row["random_k_accuracy"])
        finding.add_metric("mask_tests", len(tests))
        finding.summary.setdefault("tables", {})["masking (needle accuracy)"] = [
            {
                "K": r["k"],
                "top-K masked": round(r["top_k_accuracy"], 3),
                "random-K masked": round(r["random_k_accuracy"], 3),
            }
            for r in rows
        ]
        finding.add_json("random_draws.json", draws_log, "heads masked in each random draw")
        figure = line_plot(
            {
                "top-K retrieval heads masked": (
                    [r["k"] for r in rows],
                    [r["top_k_accuracy"] for r in rows],
                ),
                "K random non-retrieval heads masked": (
                    [r["k"] for r in rows],
                    [r["random_k_accuracy"] for r in rows],
                ),
            },
            f"masking check ({handle.name})",
            "heads masked (K)",
            "needle accuracy (ROUGE-1 recall)",
        )
        finding.add_figure(
            "masking.png", figure, "needle accuracy with top-K vs random-K heads masked"
        )

    def _masked_batch(self, handle, jobs, max_new_tokens, stops) -> list[str]:
        """Responses of (test, K, kind, heads) generations, each row with its own mask."""
        tests = [job[0] for job in jobs]
        masks = [job[3] for job in jobs]
        items = [UniformAttention(masks)] if any(masks) else []
        _, result = self._generate(handle, tests, max_new_tokens, stops, items)
        return [handle.decode(tokens).strip() for tokens in result.tokens]

    # -- other heads -------------------------------------------------------------------------
    @staticmethod
    def _compare(ctx, finding, scores: torch.Tensor, params) -> None:
        """Overlap of the retrieval heads with the heads of run `compare_with`, which
        are chosen by that run's metric and its analysis's own rule."""
        run_id = params.compare_with
        run = ctx.findings.run(run_id)
        # a problem here only skips the comparison: the scores above are kept
        if run.status != "succeeded":
            finding.summary["compare warning"] = f"run {run_id} has status {run.status}"
            return
        metric = ctx.findings.head_metric(run_id)
        other = ctx.findings.head_scores(run_id, metric)
        if set(other) != {
            (layer, head) for layer in range(scores.shape[0]) for head in range(scores.shape[1])
        }:
            finding.summary["compare warning"] = f"run {run_id} scores another model shape"
            return
        analysis = ctx.registry.analyses.get(run.analysis) if ctx.registry else None
        rule, value = analysis.head_selection if analysis else ("top", 10)
        theirs = select_heads(other, rule, value)
        ours = select_heads(
            {(layer, head): float(scores[layer, head]) for layer, head in other},
            "threshold",
            params.threshold,
        )
        result = compare_head_sets(ours, theirs, scores.shape[0])
        finding.add_metric("compare_shared_heads", result["intersection"])
        finding.add_metric("compare_jaccard", result["jaccard"])
        finding.add_metric("compare_overlap_coefficient", result["overlap_coefficient"])
        their_ranks = {
            head: rank + 1 for rank, head in enumerate(sorted(other, key=lambda h: (-other[h], h)))
        }
        finding.summary["compared with"] = {
            "run": run_id,
            "analysis": run.analysis,
            "metric": metric,
            "their heads": f"{metric} {rule} {value:g}: {len(theirs)} heads",
            "shared": [f"L{layer}H{head}" for layer, head in result["shared_heads"]],
        }
        finding.summary.setdefault("tables", {})[f"retrieval heads by {metric} (run {run_id})"] = [
            {
                "head": f"L{layer}H{head}",
                "retrieval_score": round(float(scores[layer, head]), 3),
                metric: round(other[(layer, head)], 3),
                f"{metric} rank": their_ranks[(layer, head)],
            }
            for layer, head in sorted(ours, key=lambda head: -float(scores[head]))
        ]
