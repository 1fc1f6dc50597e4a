"""Needle-in-a-haystack prompts, built in the model's own token space.

A test hides a needle sentence at a depth (percent of the haystack) inside
haystack prose, so that the whole prompt (haystack, needle, question, template)
is at most `length` tokens of the model's tokenizer. The needle goes in at the
sentence boundary at or before the target depth: the last token whose text ends
a sentence, found from the tokenizer's offsets (no hard-coded token ids). The
answer span (the words to copy) is located in token space from the same offsets
(`core.spans`, as every marked span is).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from headscope.core.errors import InvalidParamsError
from headscope.core.jsonl import read_jsonl
from headscope.core.spans import CharSpan, resolve

DEFAULT_TEMPLATE = (
    "{context}\n\nAnswer the question using the text above.\n"
    "Question: {question}\nAnswer: {answer_prefix}"
)
#: named prompt templates: the published one starts the answer with the needle's
#: own words (answer_prefix); `bare` leaves the model to start from "Answer:"
TEMPLATES = {
    "answer-prefix": DEFAULT_TEMPLATE,
    "bare": "{context}\n\nAnswer the question using the text above.\nQuestion: {question}\nAnswer:",
}
_SENTENCE_END = re.compile(r"""[.!?]["')\]]?\s*$""")
_FIELDS = {"context", "question", "answer_prefix"}


@dataclass(frozen=True)
class Needle:
    needle: str
    question: str
    answer: str
    answer_prefix: str = ""


@dataclass
class NeedleTest:
    """One prompt: its tokens, where the answer sits in them, and what made it."""

    needle_index: int
    needle: Needle
    length: int
    depth: float
    prompt: str
    prompt_ids: list[int]
    answer_span: tuple[int, int]  # token positions [start, end) of the answer in the prompt
    needle_char_start: int

    @property
    def answer_ids(self) -> list[int]:
        start, end = self.answer_span
        return self.prompt_ids[start:end]


def data_dir() -> Path:
    return Path(str(files("headscope.plugins.retrieval_heads").joinpath("data")))


def default_needles_path() -> Path:
    return data_dir() / "needles.jsonl"


def default_haystack_paths() -> list[Path]:
    return sorted((data_dir() / "haystack").glob("*.txt"))


def heldout_needles_path() -> Path:
    """Needles never used for scoring: the masking check's default."""
    return data_dir() / "heldout" / "needles.jsonl"


def heldout_haystack_paths() -> list[Path]:
    """Haystack text never used for scoring: the masking check's default."""
    return sorted((data_dir() / "heldout" / "haystack").glob("*.txt"))


def resolve_template(value: str) -> str:
    """A template name (`TEMPLATES`) or a template of its own, checked."""
    template = TEMPLATES.get(value, value)
    check_template(template)
    return template


def check_disjoint(
    scoring: tuple[list[Needle], list[str]], heldout: tuple[list[Needle], list[str]]
) -> None:
    """Held-out needles and haystack must share nothing with the scoring ones."""
    needles = {n.needle for n in scoring[0]} & {n.needle for n in heldout[0]}
    answers = {n.answer for n in scoring[0]} & {n.answer for n in heldout[0]}
    documents = set(scoring[1]) & set(heldout[1])
    if needles or answers:
        shared = sorted(needles | answers)
        raise InvalidParamsError(
            f"held-out needles repeat scoring needles or answers: {shared[:3]}"
        )
    if documents:
        raise InvalidParamsError(
            f"{len(documents)} held-out haystack document(s) are also scoring documents"
        )


def load_needles(path: Path | None = None) -> list[Needle]:
    """Needles from JSONL (`needle`, `question`, `answer`, optional `answer_prefix`)."""
    path = Path(path) if path is not None else default_needles_path()
    needles = []
    for where, row in read_jsonl(path, "needles file"):
        missing = [k for k in ("needle", "question", "answer") if not str(row.get(k, "")).strip()]
        if missing:
            raise InvalidParamsError(f"{where}: missing or empty {', '.join(missing)}")
        needle = Needle(
            str(row["needle"]).strip(),
            str(row["question"]).strip(),
            str(row["answer"]).strip(),
            str(row.get("answer_prefix", "") or "").strip(),
        )
        if needle.answer not in needle.needle:
            raise InvalidParamsError(
                f"{where}: the answer {needle.answer!r} is not part of the needle"
            )
        needles.append(needle)
    if not needles:
        raise InvalidParamsError(f"needles file {path} holds no needles")
    return needles


def load_haystack(paths: list[Path] | None = None) -> list[str]:
    """Haystack documents (plain text files); the built-in corpus by default."""
    paths = [Path(p) for p in paths] if paths else default_haystack_paths()
    documents = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise InvalidParamsError(f"haystack file not found: {path}") from None
        except (UnicodeDecodeError, IsADirectoryError) as error:
            raise InvalidParamsError(
                f"haystack file {path} is not readable text: {error}"
            ) from None
        if not text:
            raise InvalidParamsError(f"haystack file {path} is empty")
        documents.append(text)
    if not documents:
        raise InvalidParamsError("no haystack documents found")
    return documents


def check_template(template: str) -> None:
    """The template must place {context} and {question}; other fields are refused."""
    try:
        names = {
            field for _, field, _, _ in string.Formatter().parse(template) if field is not None
        }
    except ValueError as error:
        raise InvalidParamsError(f"prompt template is malformed: {error}") from None
    unknown = names - _FIELDS
    if unknown:
        raise InvalidParamsError(
            f"prompt template has unknown fields {sorted(unknown)}; use {sorted(_FIELDS)}"
        )
    for required in ("context", "question"):
        if required not in names:
            raise InvalidParamsError(f"prompt template must contain {{{required}}}")


class HaystackBuilder:
    """Builds needle tests for one tokenizer, haystack and template."""

    def __init__(self, tokenizer: Any, documents: list[str], template: str = DEFAULT_TEMPLATE):
        check_template(template)
        self.tokenizer = tokenizer
        self.documents = documents
        self.template = template

    def _encode(self, text: str, special: bool) -> tuple[list[int], list[tuple[int, int]]]:
        encoded = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]

    def _haystack_text(self, start_document: int, min_chars: int) -> str:
        parts, total, index = [], 0, start_document
        while total < min_chars:
            text = self.documents[index % len(self.documents)]
            parts.append(text)
            total += len(text) + 2
            index += 1
        return "\n\n".join(parts)

    def _render(self, context: str, needle: Needle) -> str:
        return self.template.format(
            context=context, question=needle.question, answer_prefix=needle.answer_prefix
        ).rstrip(" ")

    def build(self, needle: Needle, length: int, depth: float, needle_index: int = 0) -> NeedleTest:
        if not 0 <= depth <= 100:
            raise InvalidParamsError(f"depth {depth} is outside 0-100 (percent of the haystack)")
        frame = len(self._encode(self._render(needle.needle, needle), special=True)[0])
        budget = length - frame
        if budget < 1:
            raise InvalidParamsError(
                f"length {length} leaves no room for haystack text: the needle, question "
                f"and template alone take {frame} tokens"
            )
        for _ in range(4):  # re-tokenising at the joins can add a token or two
            test = self._build(needle, length, depth, needle_index, budget)
            excess = len(test.prompt_ids) - length
            if excess <= 0:
                return test
            budget -= excess
        raise InvalidParamsError(f"could not fit a prompt into {length} tokens")

    def _build(
        self, needle: Needle, length: int, depth: float, index: int, budget: int
    ) -> NeedleTest:
        haystack = self._haystack_text(index, min_chars=budget * 8 + 64)
        ids, offsets = self._encode(haystack, special=False)
        while len(ids) < budget:  # very short token budgets per char: grow the text
            haystack = haystack + "\n\n" + haystack
            ids, offsets = self._encode(haystack, special=False)
        haystack = haystack[: offsets[budget - 1][1]]
        offsets = offsets[:budget]
        insert_at = self._insertion_char(haystack, offsets, depth)
        before, after = haystack[:insert_at], haystack[insert_at:]
        joiner = "" if not before or before.endswith((" ", "\n")) else " "
        tail = "" if not after or after.startswith((" ", "\n")) else " "
        context = before + joiner + needle.needle + tail + after
        prompt = self._render(context, needle)
        context_start = self._render("\x00", needle).index("\x00")
        needle_start = context_start + len(before) + len(joiner)
        answer_start = needle_start + needle.needle.index(needle.answer)
        answer_end = answer_start + len(needle.answer)
        prompt_ids, prompt_offsets = self._encode(prompt, special=True)
        covered = resolve(
            [CharSpan(answer_start, answer_end)], len(prompt_ids), prompt_offsets, len(prompt)
        )
        span = (covered[0], covered[-1] + 1)
        return NeedleTest(index, needle, length, depth, prompt, prompt_ids, span, needle_start)

    def _insertion_char(self, haystack: str, offsets: list[tuple[int, int]], depth: float) -> int:
        """Character offset right after the last sentence-ending token before `depth`."""
        target = round(len(offsets) * depth / 100)
        for index in range(target - 1, -1, -1):
            start, end = offsets[index]
            if _SENTENCE_END.search(haystack[max(0, end - 3) : end]):
                return end
        return 0
