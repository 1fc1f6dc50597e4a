"""Tasks: prompt sets with a metric, the input of circuit analyses.

A task builds seeded examples for a model's tokenizer. An example is a prompt,
the next tokens that count as right (`answers`) and wrong (`distractors`), and
either a corrupted prompt (the same prompt with the task's information removed,
e.g. IOI with a third name instead of the repeated subject) or a label saying
whether it is a positive (the model can predict the answer) or a negative prompt.

`prepare_task` turns examples into `TaskPairs` for one model: token ids, answer
ids checked to be single tokens, and clean/corrupted prompts checked to have the
same token length (position-wise patching needs it). Labelled examples are paired
positive-with-negative of equal length. Circuit analyses use the clean prompts as
positives and the corrupted ones as negatives.

Built-in tasks (`ioi`, `greater-than`) come from `headscope.plugins.circuits.tasks`
through the `register_tasks` hook; `jsonl:PATH` loads a user task from a file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from .budget import MemoryBudget, run_batched
from .errors import InvalidParamsError
from .jsonl import read_jsonl
from .metrics import MetricKind, TokenMetric
from .models import ModelHandle
from .tracing import Batch, forward, make_batch

Label = Literal["positive", "negative"]


@dataclass(frozen=True)
class TaskExample:
    """One prompt with right and wrong next tokens, and a corruption or a label."""

    prompt: str
    answers: tuple[str, ...]
    distractors: tuple[str, ...]
    corrupted: str | None = None
    label: Label | None = None
    where: str = ""  # e.g. "line 3", for error messages


class Task:
    """Base class for tasks; subclasses set `name` and implement `examples`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    metric: ClassVar[MetricKind] = "logit_diff"
    metric_description: ClassVar[str] = "logit of the answer minus logit of the distractor"
    #: True: an answer that is not one token is an error (user files); False: skip it
    strict: ClassVar[bool] = False

    def examples(self, tokenizer: Any, n: int, rng: np.random.Generator) -> list[TaskExample]:
        """About `n` seeded examples whose answers suit `tokenizer`."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "metric": self.metric,
            "metric_description": self.metric_description,
        }


def single_token(tokenizer: Any, text: str) -> int | None:
    """The id of `text` if the tokenizer writes it as exactly one token, else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


@dataclass
class TaskPair:
    """A clean prompt and its corrupted partner, tokenised, with answer ids."""

    clean: list[int]
    corrupted: list[int]
    answers: tuple[int, ...]
    distractors: tuple[int, ...]
    example: TaskExample
    corrupted_text: str


@dataclass
class TaskData:
    """Prepared pairs of one task for one model, and why examples were dropped."""

    task: Task
    pairs: list[TaskPair]
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def subset(self, n: int) -> TaskData:
        return TaskData(self.task, self.pairs[:n], self.dropped)

    def with_pairs(self, pairs: list[TaskPair]) -> TaskData:
        """The same task with these pairs (a batch of them, or a split)."""
        return TaskData(self.task, list(pairs), self.dropped)

    def clean_batch(self, handle: ModelHandle) -> Batch:
        return make_batch(handle, [p.clean for p in self.pairs])

    def corrupted_batch(self, handle: ModelHandle) -> Batch:
        return make_batch(handle, [p.corrupted for p in self.pairs])

    def metric(self) -> TokenMetric:
        return TokenMetric.from_tokens(
            [p.answers for p in self.pairs], [p.distractors for p in self.pairs], self.task.metric
        )


def prepare_task(handle: ModelHandle, task: Task, n: int, rng: np.random.Generator) -> TaskData:
    """Tokenise and check a task's examples for one model; at most `n` pairs.

    Drops (and counts) examples whose answers are not single tokens (an error for
    strict tasks, naming the example) and pairs whose prompts differ in length.
    """
    examples = task.examples(handle.tokenizer, n, rng)
    dropped: Counter[str] = Counter()
    usable: list[tuple[TaskExample, tuple[int, ...], tuple[int, ...]]] = []
    for example in examples:
        ids = _answer_ids(handle, task, example)
        if ids is None:
            dropped["answer or distractor is not one token"] += 1
            continue
        usable.append((example, *ids))
    pairs = _pair(handle, usable, dropped)
    if len(pairs) > n:
        keep = np.sort(rng.choice(len(pairs), size=n, replace=False))
        pairs = [pairs[i] for i in keep]
    if not pairs:
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items()) or "the task gave none"
        raise InvalidParamsError(
            f"task {task.name!r} has no usable examples for {handle.name} ({reasons})"
        )
    return TaskData(task, pairs, dict(dropped))


def _answer_ids(handle, task, example):
    found = []
    for group in (example.answers, example.distractors):
        ids = []
        for text in group:
            token = single_token(handle.tokenizer, text)
            if token is None:
                if task.strict:
                    count = len(handle.encode(text, add_special_tokens=False))
                    raise InvalidParamsError(
                        f"task {task.name!r}, {example.where or 'an example'}: {text!r} is "
                        f"{count} tokens for {handle.name}'s tokenizer; answers and "
                        "distractors must be single tokens"
                    )
                return None
            ids.append(token)
        found.append(tuple(ids))
    if set(found[0]) & set(found[1]):
        raise InvalidParamsError(
            f"task {task.name!r}, {example.where or 'an example'}: a token is both an "
            "answer and a distractor"
        )
    return found[0], found[1]


def _pair(handle, usable, dropped: Counter) -> list[TaskPair]:
    pairs: list[TaskPair] = []
    negatives: dict[int, list[tuple[TaskExample, list[int]]]] = {}
    positives = []
    for example, answers, distractors in usable:
        clean = handle.encode(example.prompt)
        if example.corrupted is not None:
            corrupted = handle.encode(example.corrupted)
            if len(corrupted) != len(clean):
                dropped["corrupted prompt has a different token length"] += 1
                continue
            pairs.append(
                TaskPair(clean, corrupted, answers, distractors, example, example.corrupted)
            )
        elif example.label == "negative":
            negatives.setdefault(len(clean), []).append((example, clean))
        else:
            positives.append((example, clean, answers, distractors))
    for example, clean, answers, distractors in positives:
        partners = negatives.get(len(clean))
        if not partners:
            dropped["positive without a negative of the same token length"] += 1
            continue
        negative, corrupted = partners.pop(0)
        pairs.append(TaskPair(clean, corrupted, answers, distractors, example, negative.prompt))
    unpaired = sum(len(v) for v in negatives.values())
    if unpaired:
        dropped["negative without a positive of the same token length"] += unpaired
    return pairs


# --------------------------------------------------------------------------------------
# How well the model does the task
# --------------------------------------------------------------------------------------
@dataclass
class TaskScores:
    """The task metric on clean and corrupted prompts, and top-1 answers."""

    clean: torch.Tensor  # [n]
    corrupted: torch.Tensor  # [n]
    top1_correct: torch.Tensor  # [n] bool: the most likely next token is an answer

    def summary(self) -> dict[str, float]:
        clean, corrupted = self.clean.double(), self.corrupted.double()
        return {
            "accuracy": float((clean > 0).double().mean()),
            "top1_accuracy": float(self.top1_correct.double().mean()),
            "metric_clean": float(clean.mean()),
            "metric_corrupted": float(corrupted.mean()),
            "corrupted_accuracy": float((corrupted > 0).double().mean()),
        }


def score_task(
    handle: ModelHandle,
    data: TaskData,
    batch_size: int = 32,
    budget: MemoryBudget | None = None,
) -> TaskScores:
    """Run clean and corrupted prompts; `accuracy` counts prompts whose metric favours
    the answers (metric > 0), `top1_accuracy` those whose top token is an answer.
    Pairs run in batches of at most `batch_size` that fit the memory `budget`."""

    def score(pairs: list[TaskPair]) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        chunk = data.with_pairs(pairs)
        metric = chunk.metric()
        logits = forward(handle, chunk.clean_batch(handle)).logits[:, -1]
        corrupted = metric(forward(handle, chunk.corrupted_batch(handle)).logits[:, -1])
        top1 = [int(t) in p.answers for t, p in zip(logits.argmax(-1), pairs, strict=True)]
        return list(zip(metric(logits), corrupted, top1, strict=True))

    rows = run_batched(
        handle,
        data.pairs,
        score,
        tokens=lambda p: len(p.clean),
        budget=budget,
        max_batch=batch_size,
    )
    clean, corrupted, top1 = zip(*rows, strict=True)
    return TaskScores(torch.stack(clean), torch.stack(corrupted), torch.tensor(top1))


# --------------------------------------------------------------------------------------
# User tasks from JSONL
# --------------------------------------------------------------------------------------
JSONL_PREFIX = "jsonl:"
_REQUIRED = ("prompt", "answer", "distractor")
_ALLOWED = {*_REQUIRED, "corrupted", "label"}


class JsonlTask(Task):
    """A user task: one JSON object per line with `prompt`, `answer`, `distractor` and
    either `corrupted` (same prompt, task information removed) or `label`
    (`positive` or `negative`). The metric is the answer's logit minus the
    distractor's."""

    strict = True

    def __init__(self, path: Path, examples: list[TaskExample]):
        self.path = path
        self.name = f"{JSONL_PREFIX}{path}"  # type: ignore[misc]
        self.description = f"user task from {path}"  # type: ignore[misc]
        self._examples = examples

    @classmethod
    def load(cls, path: str | Path) -> JsonlTask:
        examples = [parse_task_row(row, where) for where, row in read_jsonl(path, "task file")]
        if not examples:
            raise InvalidParamsError(f"task file {path} has no examples")
        return cls(path, examples)

    def examples(self, tokenizer, n, rng):
        return list(self._examples)


def parse_task_row(row: dict, where: str) -> TaskExample:
    """One JSONL object -> TaskExample; errors name `where` (file and line)."""
    missing = [key for key in _REQUIRED if key not in row]
    if missing:
        raise InvalidParamsError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(row) - _ALLOWED)
    if unknown:
        raise InvalidParamsError(
            f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_ALLOWED))})"
        )
    for key in _REQUIRED + tuple(k for k in ("corrupted",) if k in row):
        if not isinstance(row[key], str) or not row[key]:
            raise InvalidParamsError(f"{where}: {key} must be a non-empty string")
    has_corrupted, has_label = "corrupted" in row, "label" in row
    if has_corrupted == has_label:
        raise InvalidParamsError(f"{where}: give either corrupted or label (not both, not neither)")
    if has_label and row["label"] not in ("positive", "negative"):
        raise InvalidParamsError(
            f"{where}: label must be positive or negative, got {row['label']!r}"
        )
    return TaskExample(
        prompt=row["prompt"],
        answers=(row["answer"],),
        distractors=(row["distractor"],),
        corrupted=row.get("corrupted"),
        label=row.get("label"),
        where=where,
    )


def task_report(handle: ModelHandle, task: Task, n: int, seed: int = 0, shown: int = 5) -> dict:
    """A task's prepared examples for one model and how well the model does them."""
    data = prepare_task(handle, task, n, np.random.default_rng(seed))
    scores = score_task(handle, data)
    examples = [
        {
            "prompt": pair.example.prompt,
            "answers": list(pair.example.answers),
            "distractors": list(pair.example.distractors),
            "corrupted": pair.corrupted_text,
            "metric_clean": float(scores.clean[i]),
            "metric_corrupted": float(scores.corrupted[i]),
            "top1_correct": bool(scores.top1_correct[i]),
        }
        for i, pair in enumerate(data.pairs[:shown])
    ]
    return {
        **task.describe(),
        "model": handle.name,
        "pairs": len(data),
        "dropped": data.dropped,
        **scores.summary(),
        "examples": examples,
    }
