"""sae-circuit: circuit identification with discrete sparse autoencoders.

O'Neill & Bui 2024. Every head's residual-stream write, averaged over the prompt's
tokens, is one sample; one SAE (L1 0.02, Adam 1e-3, 500 full-batch steps) is
trained on the samples of only 10 prompts drawn from positives and negatives;
each sample's code is its most active unit. A head's score is the number of codes
it takes on positive prompts (clean task prompts) and never on negative ones
(their corruptions). The edge variant counts code pairs of two heads seen
together on positives, never on negatives.

Two choices follow the model rather than GPT-2 small: the dictionary has
`dict_per_head` units per head (the paper's 200 units for 144 heads is about
1.4), and the inputs are rescaled by one global factor so the L1 coefficient
weighs the same against the reconstruction error on any model.

Each seed trains a fresh SAE on a fresh draw of training prompts; head scores are
averaged over seeds and their spread is stored. With `reference=RUN_ID` (a stored
head-patching run) or `reference=auto` (head-patching computed here, on the first
`reference_examples` pairs), the ranking is scored against the reference heads
(importance at least `reference_min_effect`, or its top `reference_top_k`): ROC
AUC per seed, precision/recall, and both methods' runtimes.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from headscope.core.analysis import Analysis, Finding, RunContext
from headscope.core.budget import run_batched
from headscope.core.compare import select_heads
from headscope.core.errors import InvalidParamsError, param_error
from headscope.core.plots import head_heatmap
from headscope.core.runs import MAX_INT
from headscope.core.tasks import TaskData, TaskPair, prepare_task, score_task
from headscope.plugins.circuits.evaluation import ThresholdRule, evaluate_ranking
from headscope.plugins.circuits.head_patching import describe_task, reference_effects
from headscope.plugins.circuits.head_results import head_results

from . import sae


class SaeCircuitParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field("ioi", description="Task name (`headscope tasks list`) or jsonl:PATH.")
    n_examples: int = Field(
        100, ge=2, le=10_000, description="Prompt pairs: clean = positive, corrupted = negative."
    )
    train_prompts: int = Field(10, ge=1, description="Prompts the SAE is trained on.")
    dict_per_head: float = Field(
        2.0,
        gt=0,
        le=1000,
        description="SAE dictionary units per attention head of the model (the dictionary "
        "grows with the heads it must tell apart).",
    )
    dict_size: int | None = Field(
        None, ge=2, le=100_000, description="SAE dictionary units (overrides dict_per_head)."
    )
    scaling: Literal["global", "unit", "none"] = Field(
        "unit",
        description="Input scaling: unit = each (prompt, head) vector to length 1, so small "
        "heads get codes of their own (erases relative head norms); global = one factor "
        "for every vector, so their root-mean-square element is input_rms (keeps them); "
        "none = raw head outputs.",
    )
    input_rms: float = Field(
        1.0, gt=0, le=1e6, description="Root-mean-square element after scaling=global."
    )
    l1: float = Field(0.02, ge=0, description="L1 coefficient of the SAE loss.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    steps: int = Field(500, ge=1, le=1_000_000, description="Full-batch training steps.")
    seeds: int = Field(5, ge=1, le=100, description="SAEs trained (fresh init and prompts).")
    edges: bool = Field(True, description="Also score head pairs (edge variant).")
    edge_pairs: int | None = Field(
        None,
        ge=1,
        description="Edge variant: a head's score counts the top-ranked ordered head pairs "
        "it is in; default n^2/4 for n heads (published).",
    )
    circuit_size: int = Field(15, ge=1, description="Heads in the reported circuit.")
    threshold: ThresholdRule = Field(
        "harmonic",
        description="Circuit cut judged against the reference: harmonic = best harmonic "
        "mean of TPR and TNR (published); youden = best TPR - FPR.",
    )
    reference: str | None = Field(
        None, description="Run id of a head-patching run, or auto to compute one here."
    )
    reference_min_effect: float = Field(
        0.05,
        gt=0,
        description="Reference heads = those whose importance (patching effect as a "
        "fraction of the clean-corrupted metric gap) is at least this.",
    )
    reference_top_k: int | None = Field(
        None, ge=1, description="Reference heads = its top k instead of the effect cut."
    )
    reference_examples: int = Field(64, ge=1, description="Pairs patched for reference=auto.")
    batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="Prompts per forward pass at most (fewer when memory is short).",
    )

    @field_validator("reference", mode="before")
    @classmethod
    def _reference(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value is None or value == "auto":
            return value
        if isinstance(value, str) and value.isdigit():
            if not 1 <= int(value) <= MAX_INT:
                raise ValueError(f"a reference run id is 1..{MAX_INT}")
            return value
        raise ValueError("reference must be a run id or auto")


class SaeCircuit(Analysis):
    name = "sae-circuit"
    version = "2"
    summary = "Circuit heads from a discrete SAE's task-specific codes (O'Neill & Bui)."
    Params = SaeCircuitParams
    primary_metric = "unique_codes"
    head_selection = ("top", 15)

    @classmethod
    def check_runs(cls, params: SaeCircuitParams, findings, model: str) -> None:
        if params.reference not in (None, "auto"):
            run = findings.require_run(int(params.reference), "reference")
            if run.model != model:
                raise param_error("reference", f"run {run.id} is on {run.model}, not {model}")

    @classmethod
    def check(cls, params: SaeCircuitParams, handle, registry) -> None:
        heads = handle.n_layers * handle.n_heads
        if params.reference is not None and (params.reference_top_k or 0) >= heads:
            raise param_error(
                "reference_top_k",
                f"{params.reference_top_k} is not below {handle.name}'s {heads} heads "
                f"({handle.n_layers} layers x {handle.n_heads}): the reference must leave "
                "some heads out",
            )
        task = registry.task(params.task)
        data = prepare_task(handle, task, params.n_examples, np.random.default_rng(0))
        if params.train_prompts > 2 * len(data):
            raise InvalidParamsError(
                f"train_prompts={params.train_prompts} exceeds the {2 * len(data)} prompts "
                f"of {len(data)} pairs"
            )

    def run(self, ctx: RunContext, params: SaeCircuitParams) -> Finding:
        handle = ctx.model
        task = ctx.registry.task(params.task)
        data = prepare_task(handle, task, params.n_examples, ctx.rng)
        finding = Finding()
        describe_task(finding, handle, data, params.batch_size, ctx.budget)
        shape = (handle.n_layers, handle.n_heads)
        heads = handle.n_layers * handle.n_heads
        units = dictionary_units(params, heads)
        finding.add_metric("dict_size", units)
        # the reference first: a cut that selects no head fails before any training
        reference = None
        if params.reference is not None:
            reference = self._reference(ctx, params, data, finding)
            reference["heads"] = reference_heads(params, reference["scores"])

        started = time.perf_counter()
        positives, negatives = self._capture(ctx, data, params.batch_size)
        capture_seconds = time.perf_counter() - started
        seeds = [
            self._one_seed(ctx, params, positives, negatives, s, units, handle.n_heads)
            for s in range(params.seeds)
        ]
        sae_seconds = time.perf_counter() - started
        node = np.stack([s["node"] for s in seeds]).reshape(-1, *shape)
        per_seed = {"unique_codes": node.tolist()}
        finding.add_head_scores("unique_codes", node.mean(0))
        finding.add_head_scores("unique_codes_std", node.std(0))
        finding.add_metric("sae_seconds", sae_seconds)
        finding.add_metric(
            "one_sae_seconds", capture_seconds + np.mean([s["seconds"] for s in seeds])
        )
        finding.add_metric("capture_seconds", capture_seconds)
        finding.add_metric("final_loss_mean", float(np.mean([s["loss"] for s in seeds])))
        finding.add_metric("input_scale_mean", float(np.mean([s["scale"] for s in seeds])))
        finding.add_metric("codes_used_mean", float(np.mean([s["codes_used"] for s in seeds])))
        if params.edges:
            finding.add_metric("edge_pairs", edge_pairs(params, heads))
            edge = np.stack([s["edge"] for s in seeds]).reshape(-1, *shape)
            finding.add_head_scores("edge_score", edge.mean(0))
            per_seed["edge_score"] = edge.tolist()
            pairs = np.mean([s["pairs"] for s in seeds], axis=0)
            finding.add_json(
                "edges.json", self._edge_table(pairs, handle.n_heads, 200, handle.n_heads)
            )
            finding.summary.setdefault("tables", {})["top head pairs (edge variant)"] = (
                self._edge_table(pairs, handle.n_heads, 10, handle.n_heads)
            )
        finding.add_json("seeds.json", per_seed, "head scores of each seed [seed][layer][head]")
        circuit = select_heads(_as_dict(node.mean(0)), "top", params.circuit_size)
        finding.summary["circuit"] = sorted(circuit)

        if reference is not None:
            self._evaluate(finding, params, seeds, node, reference, shape)
        figure = head_heatmap(node.mean(0), f"unique codes on {task.name} ({handle.name})")
        finding.add_figure("unique_codes.png", figure, "codes unique to positive prompts")
        return finding

    # -- steps ----------------------------------------------------------------------
    def _capture(self, ctx, data: TaskData, batch_size: int):
        """Head results [n, layers * heads, d] for clean (positive) and corrupted prompts,
        in batches of at most `batch_size` pairs that fit the run's memory budget."""
        handle = ctx.model

        def capture(pairs: list[TaskPair]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            chunk = data.with_pairs(pairs)
            clean = head_results(handle, chunk.clean_batch(handle))
            corrupted = head_results(handle, chunk.corrupted_batch(handle))
            return list(zip(clean, corrupted, strict=True))

        rows = run_batched(
            handle,
            data.pairs,
            capture,
            tokens=lambda pair: len(pair.clean),
            budget=ctx.budget,
            max_batch=batch_size,
            progress=lambda done, total: ctx.progress(done, total, f"capture {done}/{total} pairs"),
        )
        clean, corrupted = (torch.stack(side).flatten(1, 2) for side in zip(*rows, strict=True))
        return clean, corrupted

    def _one_seed(
        self, ctx, params, positives, negatives, index: int, units: int, heads_per_layer: int
    ) -> dict[str, Any]:
        started = time.perf_counter()
        seed = ctx.seed * 1000 + index
        prompts = torch.cat([positives, negatives])
        chosen = np.random.default_rng(seed).choice(
            len(prompts), min(params.train_prompts, len(prompts)), replace=False
        )
        samples = prompts[torch.as_tensor(chosen)].reshape(-1, prompts.shape[-1])
        scale = 1.0
        if params.scaling == "global":  # one factor, from the training samples only
            scale = sae.global_scale(samples, params.input_rms)
        positives, negatives, samples = (
            scale_inputs(x, params.scaling, scale) for x in (positives, negatives, samples)
        )

        def on_step(step: int) -> None:
            done = index * params.steps + step
            ctx.progress(done, params.seeds * params.steps, f"SAE seed {index + 1}/{params.seeds}")

        trained = sae.train_sae(samples, units, params.l1, params.lr, params.steps, seed, on_step)
        pos = sae.codes(trained.sae, positives)
        neg = sae.codes(trained.sae, negatives)
        result = {
            "node": sae.unique_code_counts(pos, neg, units),
            "loss": trained.losses[-1],
            "scale": scale,
            "codes_used": len(np.unique(np.concatenate([pos.reshape(-1), neg.reshape(-1)]))),
        }
        if params.edges:
            pairs = sae.unique_pair_counts(pos, neg, units, heads_per_layer)
            result["pairs"] = pairs
            k = edge_pairs(params, pos.shape[1])
            result["edge"] = sae.edge_node_scores(pairs, k, heads_per_layer)
        result["seconds"] = time.perf_counter() - started
        return result

    @staticmethod
    def _edge_table(pairs: np.ndarray, heads: int, k: int, heads_per_layer: int) -> list[dict]:
        """The k head pairs with most code pairs unique to positives (mean over seeds)."""
        return [
            {
                "head_a": f"L{u // heads}H{u % heads}",
                "head_b": f"L{v // heads}H{v % heads}",
                "unique_code_pairs": count,
            }
            for u, v, count in sae.top_pairs(pairs, k, heads_per_layer)
        ]

    def _reference(self, ctx, params, data: TaskData, finding: Finding) -> dict[str, Any]:
        """Reference head scores [L, H], their source and runtime."""
        handle = ctx.model
        if params.reference == "auto":
            subset = data.subset(params.reference_examples)
            scores = score_task(handle, subset, params.batch_size, ctx.budget).summary()
            effects = reference_effects(
                ctx, subset, scores["metric_clean"] - scores["metric_corrupted"]
            )
            importance = effects["importance"].numpy()
            finding.add_head_scores("reference_importance", importance)
            return {
                "scores": importance,
                "seconds": effects["patching_seconds"],
                "source": f"head-patching computed here on {len(subset)} pairs",
            }
        run_id = int(params.reference)
        run = ctx.findings.run(run_id)
        if run.status != "succeeded":
            raise InvalidParamsError(f"reference run {run_id} has status {run.status}")
        if run.model != handle.name:
            raise InvalidParamsError(
                f"reference run {run_id} is on {run.model}, this run on {handle.name}"
            )
        metric = ctx.registry.head_metric(run.analysis) or "importance"
        values = ctx.findings.head_scores(run_id, metric)
        scores = np.zeros((handle.n_layers, handle.n_heads))
        for (layer, head), value in values.items():
            scores[layer, head] = value
        reference_task = run.params.get("task")
        if reference_task != params.task:
            finding.summary["reference_warning"] = (
                f"reference run {run_id} is on task {reference_task!r}, this run on {params.task!r}"
            )
        seconds = ctx.findings.metrics(run_id).get("patching_seconds", run.duration_seconds)
        return {
            "scores": scores,
            "seconds": seconds,
            "source": f"run {run_id} ({run.analysis}, {metric})",
        }

    def _evaluate(self, finding, params, seeds, node, reference, shape) -> None:
        top = reference["heads"]
        finding.add_metric("reference_heads", len(top))
        per_seed = [evaluate_ranking(n, top, params.threshold) for n in node]
        aucs = np.array([r["roc_auc"] for r in per_seed])
        finding.add_metric("auc_mean", float(aucs.mean()))
        finding.add_metric("auc_std", float(aucs.std()))
        finding.add_metric("auc_min", float(aucs.min()))
        finding.add_metric("auc_max", float(aucs.max()))
        pooled = evaluate_ranking(node.mean(0), top, params.threshold)
        finding.add_metric("auc_of_mean_scores", pooled["roc_auc"])
        for key in (
            "top_k_precision",
            "top_k_recall",
            "balanced_precision",
            "balanced_recall",
            "balanced_size",
        ):
            finding.add_metric(key, float(np.mean([r[key] for r in per_seed])))
        rows = [
            {"seed": i, "roc_auc": r["roc_auc"], "top_k_precision": r["top_k_precision"]}
            for i, r in enumerate(per_seed)
        ]
        if params.edges:
            edge = np.stack([s["edge"] for s in seeds]).reshape(-1, *shape)
            edge_aucs = np.array(
                [evaluate_ranking(e, top, params.threshold)["roc_auc"] for e in edge]
            )
            finding.add_metric("edge_auc_mean", float(edge_aucs.mean()))
            finding.add_metric("edge_auc_std", float(edge_aucs.std()))
            for row, value in zip(rows, edge_aucs, strict=True):
                row["edge_roc_auc"] = float(value)
        if reference["seconds"] is not None:
            finding.add_metric("reference_seconds", float(reference["seconds"]))
        finding.summary["reference"] = {
            "source": reference["source"],
            "cut": reference_cut(params),
            "top_heads": sorted(top),
        }
        tables = finding.summary.setdefault("tables", {})
        tables["AUC per seed"] = rows
        tables["reference heads"] = _reference_rows(reference["scores"], node.mean(0), top)


def dictionary_units(params: SaeCircuitParams, heads: int) -> int:
    """SAE units: dict_size when given, else dict_per_head units per head."""
    if params.dict_size is not None:
        return params.dict_size
    return max(2, round(params.dict_per_head * heads))


def edge_pairs(params: SaeCircuitParams, heads: int) -> int:
    """k of the edge variant: edge_pairs when given, else n^2 / 4."""
    return params.edge_pairs or sae.default_edge_pairs(heads)


def scale_inputs(x: torch.Tensor, scaling: str, scale: float) -> torch.Tensor:
    """Apply the input scaling: `scale` for global, unit length for unit."""
    if scaling == "unit":
        return torch.nn.functional.normalize(x, dim=-1)
    if scaling == "global":
        return x * scale
    return x


def reference_cut(params: SaeCircuitParams) -> str:
    if params.reference_top_k is not None:
        return f"top {params.reference_top_k} by importance"
    return f"importance >= {params.reference_min_effect:g} of the metric gap"


def reference_heads(params: SaeCircuitParams, scores: np.ndarray) -> set[tuple[int, int]]:
    """The reference circuit: its top k heads, or those with effect >= the cut."""
    by_head = _as_dict(np.abs(scores))
    if params.reference_top_k is not None:
        return select_heads(by_head, "top", params.reference_top_k)
    chosen = {head for head, value in by_head.items() if value >= params.reference_min_effect}
    if not chosen or len(chosen) == len(by_head):
        raise InvalidParamsError(
            f"reference_min_effect={params.reference_min_effect:g} selects {len(chosen)} of "
            f"{len(by_head)} heads (largest importance {max(by_head.values()):.3g}): the "
            "reference must contain some heads but not all"
        )
    return chosen


def _reference_rows(reference: np.ndarray, scores: np.ndarray, top: set) -> list[dict]:
    """The reference's top heads with their SAE score and rank (1 = best)."""
    ranked = sorted(_as_dict(scores).items(), key=lambda item: (-item[1], item[0]))
    rank = {head: i + 1 for i, (head, _) in enumerate(ranked)}
    rows = [
        {
            "layer": layer,
            "head": head,
            "reference": float(reference[layer, head]),
            "unique_codes": float(scores[layer, head]),
            "sae_rank": rank[(layer, head)],
        }
        for layer, head in top
    ]
    return sorted(rows, key=lambda row: -row["reference"])


def _as_dict(matrix: np.ndarray) -> dict[tuple[int, int], float]:
    layers, heads = matrix.shape
    return {
        (layer, head): float(matrix[layer, head])
        for layer in range(layers)
        for head in range(heads)
    }
