"""Context-faithfulness and fluency metrics, with or without attention modulation.

- `answer_logprobs`: log P(" " + answer | prompt), teacher forced; steering acts on
  the answer tokens exactly as it would while generating them.
- `evaluate`: context-faithful accuracy (P(context answer) > P(memory answer)),
  with answer log-probabilities summed over tokens and, since the two answers
  differ in length, also as a per-token mean; memorisation rate, and exact match
  of greedy answers (faithful / memorised).
- `perplexity`: the fluency guard, on neutral text whose first sentence is marked
  as context, so the modulation acts on it as on a question's context.

Each runs its prompts in batches of at most `batch_size` that fit the memory
`budget` (`core.budget.run_batched`), halved when one runs out of memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from headscope.core import tracing as T
from headscope.core.budget import MemoryBudget, run_batched
from headscope.core.errors import InvalidParamsError
from headscope.core.models import ModelHandle
from headscope.core.spans import CharSpan, MarkedPrompt, mark

from .data import NEUTRAL_TEXTS, ContextExample
from .modulation import Modulation, generate_marked

Progress = Callable[[int, int, str], None]


def continuation_logprobs(
    handle: ModelHandle,
    marked: Sequence[MarkedPrompt],
    continuations: Sequence[Sequence[int]],
    modulation: Modulation | None = None,
    batch_size: int = 8,
    budget: MemoryBudget | None = None,
) -> list[list[float]]:
    """Per-token log-probabilities of each continuation after its marked prompt."""
    if len(marked) != len(continuations):
        raise InvalidParamsError("one continuation per prompt")
    if any(not c for c in continuations):
        raise InvalidParamsError("a continuation is empty")

    def score(rows: list[tuple[MarkedPrompt, list[int]]]) -> list[list[float]]:
        prompts = [m for m, _ in rows]
        tails = [t for _, t in rows]
        batch = T.make_batch(handle, [list(m.ids) + t for m, t in rows])
        width = max(len(t) for t in tails)
        # logits at the positions that predict each continuation token (padded per row)
        at = [[-len(t) - 1 + i for i in range(len(t))] + [-2] * (width - len(t)) for t in tails]
        items = modulation.items(handle, batch, prompts) if modulation is not None else []
        logits = T.forward(handle, batch, items, logits_at=at).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        return [
            [float(logp[row, i, token]) for i, token in enumerate(tail)]
            for row, tail in enumerate(tails)
        ]

    return run_batched(
        handle,
        [(m, list(c)) for m, c in zip(marked, continuations, strict=True)],
        score,
        tokens=lambda row: len(row[0].ids) + len(row[1]),
        budget=budget,
        max_batch=batch_size,
    )


def answer_ids(handle: ModelHandle, answer: str) -> list[int]:
    return handle.encode(" " + answer.strip(), add_special_tokens=False)


def answer_token_logprobs(
    handle: ModelHandle,
    examples: Sequence[ContextExample],
    answers: Sequence[str],
    modulation: Modulation | None = None,
    batch_size: int = 8,
    budget: MemoryBudget | None = None,
) -> list[list[float]]:
    """Per-token log P(" " + answer | example prompt) for each example."""
    marked = [e.marked(handle) for e in examples]
    tails = [answer_ids(handle, a) for a in answers]
    return continuation_logprobs(handle, marked, tails, modulation, batch_size, budget)


def answer_logprobs(
    handle: ModelHandle,
    examples: Sequence[ContextExample],
    answers: Sequence[str],
    modulation: Modulation | None = None,
    batch_size: int = 8,
    budget: MemoryBudget | None = None,
) -> list[float]:
    """log P(" " + answer | example prompt) for each example."""
    per_token = answer_token_logprobs(handle, examples, answers, modulation, batch_size, budget)
    return [sum(lp) for lp in per_token]


def normalise(text: str) -> str:
    """Lower case, first line, no surrounding quotes or punctuation, single spaces."""
    line = text.strip().split("\n", 1)[0].lower()
    line = re.sub(r"\s+", " ", line)
    return line.strip(" \"'`.,;:!?()[]")


def matches(generated: str, answer: str) -> bool:
    """The generated answer starts with `answer` (as whole words)."""
    got, want = normalise(generated), normalise(answer)
    if not want or not got.startswith(want):
        return False
    return len(got) == len(want) or not got[len(want)].isalnum()


def generate_answers(
    handle: ModelHandle,
    examples: Sequence[ContextExample],
    modulation: Modulation | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    budget: MemoryBudget | None = None,
) -> list[str]:
    """Greedy answers (up to a newline) to each example's prompt."""

    def answer(chunk: list[MarkedPrompt]) -> list[str]:
        result = generate_marked(handle, chunk, modulation, max_new_tokens, stop_at_newline=True)
        return [result.text(handle, row) for row in range(len(chunk))]

    return run_batched(
        handle,
        [e.marked(handle) for e in examples],
        answer,
        tokens=lambda m: len(m.ids) + max_new_tokens,
        budget=budget,
        max_batch=batch_size,
    )


@dataclass
class Evaluation:
    """Metrics of one setting on a set of examples, and the per-example rows."""

    label: str
    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)


def evaluate(
    handle: ModelHandle,
    examples: Sequence[ContextExample],
    modulation: Modulation | None = None,
    generate: bool = True,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    label: str | None = None,
    budget: MemoryBudget | None = None,
) -> Evaluation:
    """Faithfulness of the model (steered by `modulation`, if given) on `examples`.

    faithful_prob: share of examples with a memory answer where the context answer
    is more probable (log-probabilities summed over the answer's tokens);
    faithful_prob_per_token: the same with per-token mean log-probabilities, so a
    longer answer is not penalised for its length; memorised_prob: the rest of
    faithful_prob. faithful_em / memorised_em: share of greedy answers that start
    with the context / memory answer. Each row keeps the per-example outcomes
    (`faithful`, `faithful_per_token`, booleans) for paired intervals.
    """
    if not examples:
        raise InvalidParamsError("no examples to evaluate")
    label = label or (modulation.label if modulation is not None else "baseline")
    context_tokens = answer_token_logprobs(
        handle, examples, [e.answer for e in examples], modulation, batch_size, budget
    )
    context_lp = [sum(lp) for lp in context_tokens]
    with_memory = [i for i, e in enumerate(examples) if e.memory_answer]
    memory_tokens: dict[int, list[float]] = {}
    if with_memory:
        scored = answer_token_logprobs(
            handle,
            [examples[i] for i in with_memory],
            [examples[i].memory_answer for i in with_memory],
            modulation,
            batch_size,
            budget,
        )
        memory_tokens = dict(zip(with_memory, scored, strict=True))
    memory_lp = {i: sum(lp) for i, lp in memory_tokens.items()}
    context_mean = [_mean(lp) for lp in context_tokens]
    memory_mean = {i: _mean(lp) for i, lp in memory_tokens.items()}
    generated = (
        generate_answers(handle, examples, modulation, max_new_tokens, batch_size, budget)
        if generate
        else [None] * len(examples)
    )
    rows = []
    for i, example in enumerate(examples):
        row = {
            "kind": example.kind,
            "question": example.question,
            "answer": example.answer,
            "memory_answer": example.memory_answer,
            "answer_logprob": context_lp[i],
            "memory_logprob": memory_lp.get(i),
            "answer_logprob_per_token": context_mean[i],
            "memory_logprob_per_token": memory_mean.get(i),
        }
        if i in memory_lp:
            row["faithful"] = context_lp[i] > memory_lp[i]
            row["faithful_per_token"] = context_mean[i] > memory_mean[i]
        if generate:
            row["generated"] = generated[i]
            row["faithful_em"] = matches(generated[i], example.answer)
            row["memorised_em"] = bool(
                example.memory_answer and matches(generated[i], example.memory_answer)
            )
        rows.append(row)
    metrics = {"examples": float(len(examples)), "answer_logprob": _mean(context_lp)}
    if with_memory:
        metrics["faithful_prob"] = _mean([rows[i]["faithful"] for i in with_memory])
        metrics["memorised_prob"] = 1.0 - metrics["faithful_prob"]
        metrics["margin"] = _mean([context_lp[i] - memory_lp[i] for i in with_memory])
        metrics["faithful_prob_per_token"] = _mean(
            [rows[i]["faithful_per_token"] for i in with_memory]
        )
        metrics["margin_per_token"] = _mean([context_mean[i] - memory_mean[i] for i in with_memory])
    if generate:
        metrics["faithful_em"] = _mean([r["faithful_em"] for r in rows])
        metrics["memorised_em"] = _mean([r["memorised_em"] for r in rows])
    return Evaluation(label, metrics, rows)


def perplexity(
    handle: ModelHandle,
    modulation: Modulation | None = None,
    texts: Sequence[tuple[str, str]] = NEUTRAL_TEXTS,
    batch_size: int = 8,
    budget: MemoryBudget | None = None,
) -> float:
    """Perplexity of each text's continuation after its marked first sentence."""
    marked, tails = [], []
    for first, rest in texts:
        prompt = f"Text: {first}"
        marked.append(mark(handle, prompt, [CharSpan(len("Text: "), len(prompt))]))
        tails.append(handle.encode(" " + rest, add_special_tokens=False))
    logprobs = continuation_logprobs(handle, marked, tails, modulation, batch_size, budget)
    tokens = sum(len(lp) for lp in logprobs)
    return math.exp(-sum(sum(lp) for lp in logprobs) / tokens)


def _mean(values: Sequence[float | bool]) -> float:
    return float(sum(float(v) for v in values) / len(values)) if values else float("nan")
