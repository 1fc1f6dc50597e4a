"""head-detector: previous-token, duplicate-token, induction and attention-sink heads.

Scores follow TransformerLens's head detector ("mul" measure: attention mass on the
pattern's positions divided by total attention, i.e. the mean over query rows) on
the data RazorAttention uses for echo and induction heads:

- previous_token: attention to position i-1, on short natural prompts;
- duplicate_token (echo): attention to earlier copies of the current token, on
  random token sequences repeated `repeats` times;
- induction: attention to the token right after an earlier copy of the current
  token, on the same repeated sequences;
- sink_mass: attention to the first token, on natural prompts, rows 1..n-1.

Each score is averaged over prompts. All four come from one pass per batch with
the core attention-row primitive (rows from q and k, one layer at a time).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from headscope.core.analysis import Analysis, Finding, RunContext, top_heads
from headscope.core.budget import run_batched
from headscope.core.errors import ContextTooLongError, InvalidParamsError
from headscope.core.hookspecs import hookimpl
from headscope.core.plots import head_heatmap
from headscope.core.tracing import AttentionPatternScores, Batch, forward, make_batch

NATURAL_PROMPTS = [
    "The old lighthouse keeper climbed the stairs every evening to light the lamp.",
    "After the rain stopped, the children ran outside to splash in the puddles.",
    "She opened the letter slowly, afraid of what the first line might say.",
    "The market was crowded with farmers selling apples, cheese and fresh bread.",
    "A small boat drifted across the lake while the sun set behind the hills.",
    "He forgot his umbrella at the station and had to walk home in the storm.",
    "Scientists measured the temperature of the ocean at twelve different depths.",
    "The orchestra tuned their instruments as the audience took their seats.",
    "Our train was delayed for an hour because of snow on the tracks near the border.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "In the library, a quiet student turned the pages of an ancient map.",
    "The committee agreed to meet again next week to discuss the new budget.",
]

METRICS = ("previous_token", "duplicate_token", "induction", "sink_mass")


class HeadDetectorParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_random: int = Field(4, ge=1, le=256, description="Random token sequences to repeat.")
    random_length: int = Field(64, ge=2, le=4096, description="Tokens in each random block.")
    repeats: int = Field(4, ge=2, le=16, description="Copies of each random block.")
    prompts: list[str] | None = Field(None, description="Natural prompts (default: built-in).")
    batch_size: int = Field(
        4, ge=1, le=256, description="Prompts per pass at most (fewer when memory is short)."
    )


def duplicate_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """[s, s] bool: key j < i holds the same token as query i."""
    same = tokens[:, None] == tokens[None, :]
    return torch.tril(same, diagonal=-1)


def induction_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """[s, s] bool: key j (j <= i) follows an earlier copy of query i's token."""
    dup = duplicate_pattern(tokens)
    shifted = torch.zeros_like(dup)
    shifted[:, 1:] = dup[:, :-1]
    return torch.tril(shifted)


def previous_pattern(length: int) -> torch.Tensor:
    return torch.diag(torch.ones(length - 1, dtype=torch.bool), diagonal=-1)


def _padded(patterns: list[torch.Tensor], batch: Batch) -> torch.Tensor:
    out = torch.zeros(batch.size, batch.width, batch.width, dtype=torch.bool)
    for row, (pattern, pad) in enumerate(zip(patterns, batch.pads, strict=True)):
        out[row, pad:, pad:] = pattern
    return out


class HeadDetector(Analysis):
    name = "head-detector"
    version = "1"
    summary = "Previous-token, duplicate-token, induction and sink scores for every head."
    Params = HeadDetectorParams
    primary_metric = "induction"
    head_selection = ("threshold", 0.3)

    @classmethod
    def check(cls, params: HeadDetectorParams, handle, registry) -> None:
        length = params.random_length * params.repeats + len(_prefix_ids(handle))
        if length > handle.max_positions:
            raise ContextTooLongError(
                f"random_length x repeats = {length} tokens exceeds {handle.name}'s "
                f"{handle.max_positions} positions"
            )
        if params.prompts is not None and not [p for p in params.prompts if p.strip()]:
            raise InvalidParamsError("prompts is empty; give at least one non-empty prompt")

    def run(self, ctx: RunContext, params: HeadDetectorParams) -> Finding:
        handle = ctx.model
        layers = list(range(handle.n_layers))
        totals = {m: torch.zeros(handle.n_layers, handle.n_heads) for m in METRICS}
        counts = dict.fromkeys(METRICS, 0)

        random_rows = self._random_sequences(ctx, handle, params)
        prompts = [p for p in (params.prompts or NATURAL_PROMPTS) if p.strip()]
        prefix = len(_prefix_ids(handle))

        def scores_of(kind: str, chunk: list) -> list[dict[str, torch.Tensor]]:
            """Each prompt's pattern scores, {metric: [L, H]}, from one forward pass."""
            batch = make_batch(handle, chunk)
            patterns, row_masks = self._patterns(kind, batch, prefix)
            capture = AttentionPatternScores(
                layers, patterns=patterns, row_masks=row_masks, name=kind
            )
            result = forward(handle, batch, [capture], logits_at=None)
            per_row = {
                metric: torch.stack([result.get(metric, layer) for layer in layers], 1)
                for metric in patterns
            }  # [b, L, H]
            return [{m: v[row] for m, v in per_row.items()} for row in range(batch.size)]

        total = len(random_rows) + len(prompts)
        for kind, items, offset in (
            ("random", random_rows, 0),
            ("natural", [handle.encode(p) for p in prompts], len(random_rows)),
        ):
            ctx.progress(offset, total, f"{kind} prompts")
            results = run_batched(
                handle,
                items,
                lambda chunk, kind=kind: scores_of(kind, chunk),
                tokens=len,
                budget=ctx.budget,
                max_batch=params.batch_size,
                progress=lambda done, _, kind=kind, offset=offset: ctx.progress(
                    offset + done, total, f"{kind} prompts"
                ),
            )
            for scores in results:
                for metric, value in scores.items():
                    totals[metric] += value
                    counts[metric] += 1
        ctx.progress(total, total, "done")

        finding = Finding()
        for metric in METRICS:
            mean = totals[metric] / max(counts[metric], 1)
            finding.add_head_scores(metric, mean)
            finding.add_metric(f"max_{metric}", float(mean.max()))
            finding.summary.setdefault("top_heads", {})[metric] = top_heads(mean, 5)
            figure = head_heatmap(mean.numpy(), f"{metric} ({handle.name})", metric)
            finding.add_figure(f"{metric}.png", figure, f"{metric} score per head")
        finding.add_metric("random_sequences", len(random_rows))
        finding.add_metric("natural_prompts", len(prompts))
        return finding

    @staticmethod
    def _random_sequences(ctx, handle, params) -> list[list[int]]:
        special = set(handle.tokenizer.all_special_ids)
        vocab = [i for i in range(len(handle.tokenizer)) if i not in special]
        prefix = _prefix_ids(handle)
        rows = []
        for _ in range(params.n_random):
            block = ctx.rng.choice(vocab, size=params.random_length, replace=True).tolist()
            rows.append(prefix + block * params.repeats)
        return rows

    @staticmethod
    def _patterns(kind: str, batch: Batch, prefix: int):
        per_row: dict[str, list[torch.Tensor]] = {}
        masks: dict[str, torch.Tensor] = {}
        for row in range(batch.size):
            tokens = batch.input_ids[row, batch.pads[row] :]
            n = tokens.shape[0]
            if kind == "random":
                body = tokens.clone()
                body[:prefix] = -1 - torch.arange(prefix)  # special prefix never matches
                per_row.setdefault("duplicate_token", []).append(duplicate_pattern(body))
                per_row.setdefault("induction", []).append(induction_pattern(body))
            else:
                per_row.setdefault("previous_token", []).append(previous_pattern(n))
                sink = torch.zeros(n, n, dtype=torch.bool)
                sink[1:, 0] = True
                per_row.setdefault("sink_mass", []).append(sink)
        patterns = {name: _padded(rows, batch) for name, rows in per_row.items()}
        if "sink_mass" in patterns:
            counted = batch.valid().clone()
            for row, pad in enumerate(batch.pads):
                counted[row, pad] = False  # the first token can only attend to itself
            masks["sink_mass"] = counted
            masks["previous_token"] = batch.valid()
        return patterns, (masks or None)


def _prefix_ids(handle) -> list[int]:
    """Ids the tokenizer puts before any text (Gemma's <bos>; none for SmolLM2)."""
    return handle.encode("")


@hookimpl
def register_analyses(register):
    register(HeadDetector)
