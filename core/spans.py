"""Marked spans of a prompt, mapped to token positions.

Steering and context-sensitivity scores act on "the context": a passage, a key
list, or (in a vision-language model) the image tokens. A span can be given as

- `CharSpan(start, end)`: characters `[start, end)` of the prompt text, mapped to
  every token whose characters overlap it (the tokenizer's offset mapping);
- `TokenSpan(start, end)`: token positions `[start, end)`;
- `TokenSet(positions)`: any set of token positions, e.g. image tokens.

`mark(handle, prompt, spans)` tokenises the prompt exactly as `make_batch` does
(with the model's special tokens) and returns a `MarkedPrompt`: the ids and the
sorted context positions. Spans outside the prompt raise `SpanError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import InvalidParamsError


class SpanError(InvalidParamsError):
    """A span lies outside its prompt, covers no token, or cannot be read."""


@dataclass(frozen=True)
class CharSpan:
    """Characters [start, end) of the prompt text."""

    start: int
    end: int


@dataclass(frozen=True)
class TokenSpan:
    """Token positions [start, end) of the tokenised prompt."""

    start: int
    end: int


@dataclass(frozen=True)
class TokenSet:
    """Any set of token positions (image tokens, scattered key tokens)."""

    positions: tuple[int, ...]

    def __init__(self, positions: Iterable[int]):
        object.__setattr__(self, "positions", tuple(sorted({int(p) for p in positions})))


Span = CharSpan | TokenSpan | TokenSet


@dataclass(frozen=True)
class MarkedPrompt:
    """A tokenised prompt with its marked (context) token positions."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    text: str | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def end(self) -> int:
        """One past the last marked position: where the rest of the prompt starts."""
        return self.positions[-1] + 1

    def others(self) -> list[int]:
        """Prompt positions outside the marked spans."""
        marked = set(self.positions)
        return [p for p in range(len(self.ids)) if p not in marked]


def find_text(text: str, part: str, occurrence: int = 0) -> CharSpan:
    """The character span of the `occurrence`-th copy of `part` in `text`."""
    if not part:
        raise SpanError("the span text is empty")
    starts = [m.start() for m in re.finditer(re.escape(part), text)]
    if len(starts) <= occurrence:
        shown = part if len(part) <= 40 else part[:37] + "..."
        raise SpanError(f"span text {shown!r} does not occur in the prompt")
    return CharSpan(starts[occurrence], starts[occurrence] + len(part))


def parse_range(value: str, what: str = "span") -> tuple[int, int]:
    """`"START:END"` -> (start, end), for command-line spans."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
    if not match:
        raise SpanError(f"{what} {value!r} is not START:END (two non-negative integers)")
    return int(match.group(1)), int(match.group(2))


def token_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids (with the model's special tokens) and each token's character range."""
    try:
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError) as error:
        raise SpanError(
            f"this tokenizer cannot map characters to tokens ({error}); "
            "give token spans or positions instead"
        ) from None
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def resolve(
    spans: Sequence[Span],
    n_tokens: int,
    offsets: Sequence[tuple[int, int]] | None = None,
    text_length: int | None = None,
) -> list[int]:
    """Sorted token positions covered by `spans` in a prompt of `n_tokens` tokens.

    Character spans need the prompt's `offsets` (and `text_length`); tokens that
    cover no characters (special tokens) never belong to a character span.
    """
    if not spans:
        raise SpanError("no span given: mark at least one context span")
    found: set[int] = set()
    for span in spans:
        if isinstance(span, CharSpan):
            if offsets is None or text_length is None:
                raise SpanError("character spans need the prompt text; give token positions")
            if not 0 <= span.start < span.end <= text_length:
                raise SpanError(
                    f"character span {span.start}:{span.end} is outside the prompt "
                    f"(0:{text_length} characters)"
                )
            covered = [
                i for i, (s, e) in enumerate(offsets) if e > s and s < span.end and e > span.start
            ]
            if not covered:
                raise SpanError(f"character span {span.start}:{span.end} covers no token")
            found.update(covered)
        elif isinstance(span, TokenSpan):
            if not 0 <= span.start < span.end <= n_tokens:
                raise SpanError(
                    f"token span {span.start}:{span.end} is outside the prompt "
                    f"(0:{n_tokens} tokens)"
                )
            found.update(range(span.start, span.end))
        elif isinstance(span, TokenSet):
            if not span.positions:
                raise SpanError("token set is empty")
            bad = [p for p in span.positions if not 0 <= p < n_tokens]
            if bad:
                raise SpanError(
                    f"token positions {bad[:5]} are outside the prompt (0..{n_tokens - 1})"
                )
            found.update(span.positions)
        else:
            raise SpanError(f"not a span: {span!r}")
    return sorted(found)


def mark(handle, prompt: str | Sequence[int], spans: Sequence[Span]) -> MarkedPrompt:
    """Tokenise `prompt` as `make_batch` does and map `spans` to token positions.

    `prompt` is text or token ids (ids accept token spans and sets only).
    """
    if isinstance(prompt, str):
        if not prompt:
            raise SpanError("the prompt is empty")
        needs_offsets = any(isinstance(s, CharSpan) for s in spans)
        if needs_offsets:
            ids, offsets = token_offsets(handle.tokenizer, prompt)
        else:
            ids, offsets = handle.encode(prompt), None
        positions = resolve(spans, len(ids), offsets, len(prompt))
        return MarkedPrompt(tuple(ids), tuple(positions), prompt)
    ids = [int(t) for t in prompt]
    if not ids:
        raise SpanError("the prompt is empty")
    return MarkedPrompt(tuple(ids), tuple(resolve(spans, len(ids))))


def ragged_to_rows(rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Per-row position lists of unequal length -> equal length, repeating each
    row's last position (a repeated key is the same key, so edits are unchanged)."""
    if any(not row for row in rows):
        raise SpanError("a prompt has no marked positions")
    width = max(len(row) for row in rows)
    return [list(row) + [row[-1]] * (width - len(row)) for row in rows]
