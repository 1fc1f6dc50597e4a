"""Per-head context sensitivity: how much each head looks at a marked context.

Three scores per head, each averaged over prompts (all [layers, heads]):

- `context_mass`: attention mass on the context from the query rows after it (the
  question and the answer prefix), averaged over those rows (PAINT's sensitivity);
- `answer_context_mass`: the same for the last prompt row only, the one that
  predicts the first answer token;
- `lookback_ratio`: while the model generates, a_ctx / (a_ctx + a_new) with a_ctx
  the mean attention on context tokens and a_new the mean attention on the tokens
  generated so far (Lookback Lens), averaged over generated tokens.

All three come from one traced greedy generation per batch: attention-pattern
scores at the prefill and attention rows of each new token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from headscope.core import tracing as T
from headscope.core.budget import MemoryBudget, run_batched
from headscope.core.models import ModelHandle
from headscope.core.spans import MarkedPrompt

from .modulation import generate_marked

METRICS = ("context_mass", "answer_context_mass", "lookback_ratio")


def _prefill_patterns(batch: T.Batch, marked: Sequence[MarkedPrompt]):
    """Context key columns [b, s] and the query rows after the context [b, s].

    Key columns rather than a [b, s, s] pattern keep memory linear in the length.
    """
    keys = torch.zeros(batch.size, batch.width, dtype=torch.bool)
    after = torch.zeros(batch.size, batch.width, dtype=torch.bool)
    for row, (m, pad) in enumerate(zip(marked, batch.pads, strict=True)):
        start = pad + min(m.end, len(m) - 1)
        cols = torch.tensor(m.positions) + pad
        keys[row, cols] = True
        after[row, start:] = True
    return keys, after


def lookback_ratios(
    steps: Sequence[dict],
    layers: Sequence[int],
    batch: T.Batch,
    marked: Sequence[MarkedPrompt],
    generated: Sequence[int],
    name: str = "rows",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over generated tokens of each head's lookback ratio, and the token count.

    `steps[t]` holds attention rows [b, H, 1, width + t] of the forward that read
    generated token t - 1 (t >= 1); a row stops counting after its last token.
    Returns ([b, L, H] sums, [b] counts).
    """
    n_heads = steps[0][(name, layers[0])].shape[1]
    sums = torch.zeros(batch.size, len(layers), n_heads)
    counts = torch.zeros(batch.size)
    for row, (m, pad) in enumerate(zip(marked, batch.pads, strict=True)):
        cols = torch.tensor(m.positions) + pad
        for t in range(1, generated[row]):
            rows = torch.stack([steps[t][(name, layer)][row, :, 0] for layer in layers])
            a_ctx = rows[..., cols].mean(-1)  # [L, H]
            a_new = rows[..., batch.width :].mean(-1)  # generated tokens so far
            sums[row] += a_ctx / (a_ctx + a_new).clamp(min=1e-12)
            counts[row] += 1
    return sums, counts


def context_sensitivity(
    handle: ModelHandle,
    marked: Sequence[MarkedPrompt],
    max_new_tokens: int = 8,
    batch_size: int = 8,
    progress: Callable[[int, int, str], None] | None = None,
    budget: MemoryBudget | None = None,
) -> dict[str, torch.Tensor]:
    """The three scores, each [layers, heads], averaged over prompts.

    Prompts run in batches of at most `batch_size` that fit the memory `budget`.
    """

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, f"{done}/{total} prompts")

    per_prompt = run_batched(
        handle,
        list(marked),
        lambda chunk: _prompt_scores(handle, chunk, max_new_tokens),
        tokens=lambda m: len(m.ids) + max_new_tokens,
        budget=budget,
        max_batch=batch_size,
        progress=report,
    )
    lookbacks = [p["lookback_ratio"] for p in per_prompt if p["lookback_ratio"] is not None]
    zero = torch.zeros(handle.n_layers, handle.n_heads)
    return {
        "context_mass": torch.stack([p["context_mass"] for p in per_prompt]).mean(0),
        "answer_context_mass": torch.stack([p["answer_context_mass"] for p in per_prompt]).mean(0),
        "lookback_ratio": torch.stack(lookbacks).mean(0) if lookbacks else zero,
    }


def _prompt_scores(
    handle: ModelHandle, chunk: Sequence[MarkedPrompt], max_new_tokens: int
) -> list[dict[str, torch.Tensor | None]]:
    """Each prompt's three [layers, heads] scores from one traced generation
    (`lookback_ratio` None when the prompt generated no token to look back from)."""
    layers = list(range(handle.n_layers))
    batch = T.make_batch(handle, [list(m.ids) for m in chunk])
    keys, after = _prefill_patterns(batch, chunk)
    last = torch.zeros_like(after)
    last[:, -1] = True
    capture = T.AttentionPatternScores(
        layers,
        patterns={"context_mass": keys, "answer_context_mass": keys},
        row_masks={"context_mass": after, "answer_context_mass": last},
    )
    rows = T.AttentionRows(layers, [-1], output="probs")
    result = generate_marked(
        handle, chunk, None, max_new_tokens, stop_at_newline=True, items=[capture, rows]
    )
    prefill = {
        metric: torch.stack([result.steps[0][(metric, layer)] for layer in layers], 1)
        for metric in ("context_mass", "answer_context_mass")
    }  # [b, L, H]
    generated = [len(tokens) for tokens in result.tokens]
    sums, counts = lookback_ratios(result.steps, layers, batch, chunk, generated)
    return [
        {
            "context_mass": prefill["context_mass"][row],
            "answer_context_mass": prefill["answer_context_mass"][row],
            "lookback_ratio": sums[row] / counts[row] if counts[row] > 0 else None,
        }
        for row in range(batch.size)
    ]
