"""attention-sinks: ACT's attention calibration, chosen and measured out of sample.

ACT (Yu et al. 2024) finds that attention sinks are not only the first token:
any token can take a disproportionate share of a head's attention, and
calibrating such sinks in some heads (not all) makes the model more accurate.
Here, on a task's prompts (`ioi`, `greater-than`, or a user task):

1. Sinks per head and prompt (`core.tracing.find_sinks`): keys whose mean attention
   from the rows after them exceeds `threshold`; each head's first sink is kept.
2. Head filtering on the calibration split, as ACT does: every head of the layer
   range is calibrated alone (its other sinks' attention x `beta`, the mass given
   back to the other keys, `core.tracing.SinkCalibration`); a head is kept when
   that raises the split's mean task metric by more than `min_gain`. ACT keeps a
   head when its calibration raises accuracy; the mean metric (logit or
   probability difference) is used instead because it still moves where accuracy
   is already at its ceiling.
3. On the held-out split: the uncalibrated model, the kept heads calibrated, every
   head of the range calibrated (ACT without head filtering), and as many
   layer-matched random heads (the same number per layer, never a kept head).
   Each gets task accuracy, the mean metric, and perplexity on neutral text; every
   gain comes with a paired bootstrap 95% interval over the held-out prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from headscope.core import compare, stats
from headscope.core import tracing as T
from headscope.core.analysis import Analysis, Finding, RunContext, top_heads
from headscope.core.budget import MemoryBudget, run_batched, run_each
from headscope.core.errors import InvalidParamsError
from headscope.core.plots import head_heatmap
from headscope.core.tasks import TaskData, prepare_task

from .data import NEUTRAL_TEXTS

# per-example outcome -> its name in the metrics (`<setting>.<name>`)
OUTCOMES = {"correct": "accuracy", "metric": "metric"}


class AttentionSinksParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field("ioi", description="Task name (`headscope tasks list`) or jsonl:PATH.")
    n_examples: int = Field(
        96, ge=4, le=5000, description="Prompts to draw, split into calibration and held-out."
    )
    calibration_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of prompts used to choose the heads."
    )
    beta: float = Field(0.4, gt=0, le=1, description="ACT: sink attention is scaled by this.")
    threshold: float = Field(
        0.1, gt=0, lt=1, description="ACT: a key is a sink above this mean received attention."
    )
    min_layer: int = Field(2, ge=0, description="First layer that may be calibrated (ACT: 2).")
    max_layer: int | None = Field(None, ge=0, description="Last layer (default: the last).")
    min_gain: float = Field(
        0.0, ge=0, description="A head is kept when calibrating it raises the metric by more."
    )
    max_heads: int | None = Field(
        None, ge=1, le=10000, description="Keep at most this many heads (the best gains)."
    )
    controls: bool = Field(True, description="Also run all-heads and random-heads controls.")
    random_draws: int = Field(3, ge=1, le=20, description="Layer-matched random head sets.")
    bootstrap: int = Field(2000, ge=100, le=100000, description="Resamples for 95% intervals.")
    batch_size: int = Field(
        32, ge=1, le=256, description="Prompts per pass at most (fewer when memory is short)."
    )

    @model_validator(mode="after")
    def _layer_order(self):
        if self.max_layer is not None and self.max_layer < self.min_layer:
            raise ValueError(f"max_layer {self.max_layer} is below min_layer {self.min_layer}")
        return self


def layer_range(handle, params: AttentionSinksParams) -> list[int]:
    top = handle.n_layers - 1
    last = top if params.max_layer is None else params.max_layer
    for name, value in (("min_layer", params.min_layer), ("max_layer", last)):
        if not 0 <= value <= top:
            raise InvalidParamsError(f"{name} {value} out of range 0..{top}")
    return list(range(params.min_layer, last + 1))


def split_task(data: TaskData, fraction: float, rng) -> tuple[TaskData, TaskData]:
    """(calibration, held-out): a seeded shuffle of the prompts, cut at `fraction`."""
    if len(data) < 2:
        raise InvalidParamsError(
            f"task {data.task.name!r} gave {len(data)} usable prompt(s): at least 2 are "
            "needed for a calibration and a held-out split"
        )
    order = rng.permutation(len(data)).tolist()
    cut = min(max(1, round(fraction * len(data))), len(data) - 1)
    pick = lambda idx: data.with_pairs([data.pairs[i] for i in idx])  # noqa: E731
    return pick(sorted(order[:cut])), pick(sorted(order[cut:]))


class Prompts:
    """A split's prompts with each prompt's sinks, found once; every pass over them
    batches to the memory budget (at most `batch_size` prompts)."""

    def __init__(
        self,
        handle,
        data: TaskData,
        layers,
        params: AttentionSinksParams,
        budget: MemoryBudget | None = None,
    ):
        self.data = data
        self.max_batch = params.batch_size
        self.budget = budget

        def sinks(batch: T.Batch, _chunk, _rows) -> list[dict[int, torch.Tensor]]:
            return _unpadded(T.find_sinks(handle, batch, layers, params.threshold), batch)

        #: per prompt: layer -> bool [H, its length]
        self.sinks = self._batched(handle, sinks)

    def _batched(self, handle, run: Callable[[T.Batch, TaskData, list[int]], list]) -> list:
        """`run(batch, chunk, rows)` over batches of the prompts that fit the budget;
        `rows` are the chunk's indices in the split. Results in the split's order."""

        def each(rows: list[int]) -> list:
            chunk = self.data.with_pairs([self.data.pairs[i] for i in rows])
            return run(chunk.clean_batch(handle), chunk, rows)

        return run_batched(
            handle,
            list(range(len(self.data))),
            each,
            tokens=lambda i: len(self.data.pairs[i].clean),
            budget=self.budget,
            max_batch=self.max_batch,
        )

    def outcomes(self, handle, heads: T.HeadMap | None, beta: float) -> dict[str, list[float]]:
        """Per prompt: the task metric, and whether it favours the answer (> 0)."""

        def score(batch: T.Batch, chunk: TaskData, rows: list[int]) -> list[float]:
            items = []
            if heads:
                sinks = _padded([self.sinks[i] for i in rows], batch, heads)
                items = [T.SinkCalibration(heads, sinks, beta)]
            logits = T.forward(handle, batch, items).logits[:, -1]
            return chunk.metric()(logits).tolist()

        metric = self._batched(handle, score)
        return {"metric": metric, "correct": [float(m > 0) for m in metric]}

    def sink_counts(self, n_layers: int, n_heads: int) -> torch.Tensor:
        """[layers, heads]: calibrated sinks (all but the first) per prompt, on average."""
        counts = torch.zeros(n_layers, n_heads)
        for sinks in self.sinks:
            for layer, mask in sinks.items():
                counts[layer] += mask.sum(dim=1).float()
        return counts / max(len(self.sinks), 1)

    def has_sinks(self, layer: int, head: int) -> bool:
        return any(bool(sinks[layer][head].any()) for sinks in self.sinks)


def _unpadded(sinks: dict[int, torch.Tensor], batch: T.Batch) -> list[dict[int, torch.Tensor]]:
    """Batch sinks (layer -> [b, H, width]) -> per prompt: layer -> [H, its length]."""
    return [
        {layer: mask[row, :, pad:].clone() for layer, mask in sinks.items()}
        for row, pad in enumerate(batch.pads)
    ]


def _padded(
    prompts: list[dict[int, torch.Tensor]], batch: T.Batch, heads: T.HeadMap
) -> dict[int, torch.Tensor]:
    """Per-prompt sinks laid out over `batch`'s padded columns, for the layers of `heads`
    (padding is never a sink)."""
    out = {}
    for layer in heads:
        n_heads = prompts[0][layer].shape[0]
        mask = torch.zeros(batch.size, n_heads, batch.width, dtype=torch.bool)
        for row, (sinks, pad) in enumerate(zip(prompts, batch.pads, strict=True)):
            mask[row, :, pad:] = sinks[layer]
        out[layer] = mask
    return out


def perplexity(
    handle,
    heads: T.HeadMap | None,
    beta: float,
    threshold: float,
    layers,
    batch_size: int = 32,
    budget: MemoryBudget | None = None,
) -> float:
    """Perplexity of the neutral texts, each calibrated with the sinks found on it
    (in batches of at most `batch_size` texts that fit the memory `budget`)."""

    def logprobs(texts: list[list[int]]) -> list[float]:
        batch = T.make_batch(handle, texts)
        items = []
        if heads:
            sinks = T.find_sinks(handle, batch, layers, threshold)
            items = [T.SinkCalibration(heads, sinks, beta)]
        # per row, the positions that predict its next tokens (short rows repeat one)
        width = max(len(ids) for ids in texts) - 1
        at = [list(range(len(ids) - 1)) + [0] * (width - len(ids) + 1) for ids in texts]
        logits = T.forward(handle, batch, items, logits_at=at).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        return [
            float(sum(logp[row, i, token] for i, token in enumerate(ids[1:])))
            for row, ids in enumerate(texts)
        ]

    texts = [handle.encode(text) for text in NEUTRAL_TEXTS]
    total = run_batched(handle, texts, logprobs, tokens=len, budget=budget, max_batch=batch_size)
    return math.exp(-sum(total) / sum(len(ids) - 1 for ids in texts))


class AttentionSinks(Analysis):
    name = "attention-sinks"
    version = "1"
    summary = "ACT: calibrate attention sinks in filtered heads; held-out accuracy vs controls."
    Params = AttentionSinksParams
    primary_metric = "calibration_gain"
    head_selection = ("top", 20)

    @classmethod
    def check(cls, params: AttentionSinksParams, handle, registry) -> None:
        layer_range(handle, params)
        data = prepare_task(
            handle, registry.task(params.task), params.n_examples, np.random.default_rng(0)
        )
        for pair in data.pairs:
            handle.check_length(len(pair.clean), "a task prompt")
        split_task(data, params.calibration_fraction, np.random.default_rng(0))

    def run(self, ctx: RunContext, params: AttentionSinksParams) -> Finding:
        handle = ctx.model
        layers = layer_range(handle, params)
        data = prepare_task(handle, ctx.registry.task(params.task), params.n_examples, ctx.rng)
        calibration, held_out = split_task(data, params.calibration_fraction, ctx.rng)
        ctx.progress(0, None, "finding sinks")
        cal = Prompts(handle, calibration, layers, params, ctx.budget)
        gains, kept = self._filter(ctx, params, cal, layers)

        finding = Finding()
        finding.add_head_scores("calibration_gain", gains)
        selected = torch.zeros(handle.n_layers, handle.n_heads)
        for layer, head in kept:
            selected[layer, head] = 1.0
        finding.add_head_scores("selected", selected)
        finding.add_head_scores(
            "sinks_per_prompt", cal.sink_counts(handle.n_layers, handle.n_heads)
        )

        settings: dict[str, T.HeadMap | None] = {"baseline": None}
        notes: list[str] = []
        if kept:
            settings["calibrated"] = T.head_map(sorted(kept))
        if params.controls:
            settings["all_heads"] = T.head_map({layer: range(handle.n_heads) for layer in layers})
            if kept:
                try:
                    for draw in range(params.random_draws):
                        control = compare.layer_matched_heads(kept, handle.n_heads, ctx.rng, layers)
                        label = (
                            "random_heads"
                            if params.random_draws == 1
                            else f"random_heads_{draw + 1}"
                        )
                        settings[label] = T.head_map(sorted(control))
                except InvalidParamsError as error:  # too many heads kept to match
                    notes.append(f"no random-heads control: {error}")

        ctx.progress(0, len(settings), "finding held-out sinks")
        held = Prompts(handle, held_out, layers, params, ctx.budget)
        results: dict[str, dict[str, list[float]]] = {}
        ppl: dict[str, float] = {}
        for done, (label, heads) in enumerate(settings.items()):
            ctx.check_cancelled()
            ctx.progress(done, len(settings), f"evaluating {label}")
            results[label] = held.outcomes(handle, heads, params.beta)
            ppl[label] = perplexity(
                handle, heads, params.beta, params.threshold, layers, params.batch_size, ctx.budget
            )
        ctx.progress(len(settings), len(settings), "done")
        self._report(finding, params, settings, results, ppl, ctx.seed)
        finding.add_metric("calibration_examples", len(calibration))
        finding.add_metric("held_out_examples", len(held_out))
        finding.add_metric("selected_heads", len(kept))
        finding.summary["top_heads"] = {"calibration_gain": top_heads(gains, 10)}
        if notes:
            finding.summary["notes"] = notes
        finding.summary["calibrated_heads"] = [list(h) for h in sorted(kept)]
        finding.summary["controls"] = {
            label: [[layer, h] for layer, hs in heads.items() for h in hs]
            for label, heads in settings.items()
            if label.startswith("random_heads")
        }
        figure = head_heatmap(
            gains.numpy(), f"calibration_gain ({handle.name})", "calibration_gain"
        )
        finding.add_figure(
            "calibration_gain.png", figure, "metric gain from calibrating each head alone"
        )
        return finding

    # -- steps ---------------------------------------------------------------------
    @staticmethod
    def _filter(ctx, params, cal: Prompts, layers) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """ACT's head filtering: each head calibrated alone on the calibration split."""
        handle = ctx.model
        base = cal.outcomes(handle, None, params.beta)["metric"]
        base_mean = sum(base) / len(base)
        gains = torch.zeros(handle.n_layers, handle.n_heads)
        candidates = [(layer, head) for layer in layers for head in range(handle.n_heads)]
        # a head without sinks has nothing to calibrate: it is unchanged, gain 0
        tried = [(layer, head) for layer, head in candidates if cal.has_sinks(layer, head)]

        def gain(head: tuple[int, int]) -> float:
            metric = cal.outcomes(handle, T.head_map([head]), params.beta)["metric"]
            return sum(metric) / len(metric) - base_mean

        ctx.progress(0, len(tried), "filtering heads")
        found = run_each(
            handle,
            tried,
            gain,
            progress=lambda done, total: ctx.progress(
                done, total, f"filtering heads: {done}/{total}"
            ),
        )
        for head, value in zip(tried, found, strict=True):
            gains[head] = value
        ranked = sorted(candidates, key=lambda h: (-float(gains[h]), h))
        kept = [h for h in ranked if float(gains[h]) > params.min_gain]
        if params.max_heads is not None:
            kept = kept[: params.max_heads]
        return gains, kept

    @staticmethod
    def _report(finding, params, settings, results, ppl, seed) -> None:
        draws = [label for label in results if label.startswith("random_heads_")]
        if draws:  # the random control's mean over draws, named as for one draw
            results["random_heads"] = {
                outcome: [
                    sum(results[d][outcome][i] for d in draws) / len(draws)
                    for i in range(len(results[draws[0]][outcome]))
                ]
                for outcome in OUTCOMES
            }
            ppl["random_heads"] = sum(ppl[d] for d in draws) / len(draws)
        base = results["baseline"]
        rows = []
        for label, outcome in results.items():
            for key, name in OUTCOMES.items():
                finding.add_metric(f"{label}.{name}", sum(outcome[key]) / len(outcome[key]))
            finding.add_metric(f"{label}.perplexity", ppl[label])
            if label != "baseline":
                for key, name in OUTCOMES.items():
                    _add_gain(
                        finding, f"{label}.gain_{name}", outcome[key], base[key], params, seed
                    )
                finding.add_metric(f"{label}.perplexity_change", ppl[label] / ppl["baseline"] - 1.0)
            if label in draws:
                continue  # stored; the table shows the draws' mean
            heads = settings.get(label) or settings.get("calibrated")
            rows.append(
                {
                    "setting": label,
                    "heads": 0 if label == "baseline" else sum(len(h) for h in heads.values()),
                    "accuracy": finding.metrics[f"{label}.accuracy"],
                    "metric": finding.metrics[f"{label}.metric"],
                    "ppl": ppl[label],
                    "accuracy gain [95% CI]": _interval_text(
                        finding.metrics, f"{label}.gain_accuracy", 100
                    ),
                    "metric gain [95% CI]": _interval_text(finding.metrics, f"{label}.gain_metric"),
                    "ppl change": finding.metrics.get(f"{label}.perplexity_change", 0.0),
                }
            )
        tables = {"uncalibrated vs calibrated (held-out split)": rows}
        if "random_heads" in results and "calibrated" in results:
            for key, name in OUTCOMES.items():
                _add_gain(
                    finding,
                    f"calibrated.gain_over_random_{name}",
                    results["calibrated"][key],
                    results["random_heads"][key],
                    params,
                    seed,
                )
            tables["calibrated heads minus layer-matched random heads"] = [
                {
                    "metric": name,
                    "gain over random [95% CI]": _interval_text(
                        finding.metrics,
                        f"calibrated.gain_over_random_{name}",
                        100 if name == "accuracy" else 1,
                    ),
                }
                for name in OUTCOMES.values()
            ]
        finding.summary["tables"] = tables


def _add_gain(finding, name, values, reference, params, seed) -> None:
    """Mean paired difference, with `name`_low / `name`_high: its bootstrap 95% interval."""
    pairs = [a - b for a, b in zip(values, reference, strict=True)]
    low, high = stats.bootstrap_interval(pairs, seed=seed, resamples=params.bootstrap)
    finding.add_metric(name, sum(pairs) / len(pairs))
    finding.add_metric(f"{name}_low", low)
    finding.add_metric(f"{name}_high", high)


def _interval_text(metrics: dict[str, float], name: str, scale: float = 1.0) -> str:
    """A gain and its interval ("+4.2 [+0.0, +8.3]"), times `scale`; "" if absent."""
    if name not in metrics:
        return ""
    gain, low, high = (scale * metrics[n] for n in (name, f"{name}_low", f"{name}_high"))
    return f"{gain:+.3g} [{low:+.3g}, {high:+.3g}]"
