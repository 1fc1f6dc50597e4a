"""Built-in tasks: indirect object identification (IOI) and greater-than.

- `ioi` (Wang et al. 2022): "When Mary and John went to the store, John gave a
  drink to" -> " Mary". Clean prompts repeat the subject (ABBA and BABA orders);
  the corrupted prompt replaces the repeated subject with a third name, so nothing
  tells the indirect object apart. Metric: logit of the indirect object minus
  logit of the subject. Names are kept only if the tokenizer writes them (with
  their leading space) as one token.
- `greater-than` (Hanna et al. 2023): "The war lasted from the year 1732 to the
  year 17" -> a year after 32. The corruption starts at XX01, which removes the
  comparison. Metric: probability on later years minus earlier ones. Tokenizers
  that write two-digit numbers as one token (GPT-2) are scored on the two-digit
  year; tokenizers that write digits singly (SmolLM2, Llama 3) on its tens digit:
  digits above the start year's tens digit count as later, below as earlier
  (years sharing the tens digit count as neither).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from headscope.core.errors import InvalidParamsError
from headscope.core.hookspecs import hookimpl
from headscope.core.tasks import Task, TaskExample, single_token

IOI_TEMPLATES = (
    "When {X} and {Y} went to the {place}, {S} gave a {thing} to",
    "After {X} and {Y} arrived at the {place}, {S} handed a {thing} to",
    "While {X} and {Y} were working at the {place}, {S} passed a {thing} to",
    "Then, {X} and {Y} had a long day at the {place}. {S} gave a {thing} to",
    "When {X} and {Y} got to the {place}, {S} showed a {thing} to",
    "Yesterday {X} and {Y} met at the {place}, and {S} offered a {thing} to",
    "After lunch, {X} and {Y} walked to the {place}. {S} sent a {thing} to",
    "Once {X} and {Y} reached the {place}, {S} brought a {thing} to",
    "As {X} and {Y} left the {place}, {S} threw a {thing} to",
    "Later, {X} and {Y} were waiting at the {place}, so {S} lent a {thing} to",
    "The day {X} and {Y} visited the {place}, {S} sold a {thing} to",
    "Since {X} and {Y} were at the {place}, {S} mailed a {thing} to",
)
IOI_PLACES = (
    "store", "park", "office", "school", "station", "garden", "library", "restaurant",
    "market", "beach", "hospital", "museum", "house", "hotel", "farm", "church",
)  # fmt: skip
IOI_THINGS = (
    "drink", "book", "ring", "letter", "gift", "key", "flower", "snack", "ticket",
    "pen", "hat", "bag", "cake", "ball", "map", "phone",
)  # fmt: skip
IOI_NAMES = (
    "Mary", "John", "Tom", "James", "Anna", "Sarah", "David", "Michael", "Robert", "Linda",
    "Susan", "Paul", "Mark", "Emma", "Lisa", "Kevin", "Jessica", "Daniel", "Laura", "Peter",
    "Alice", "Bob", "Kate", "Steve", "Rachel", "Andrew", "Brian", "Chris", "Amy", "Jack",
    "George", "Frank", "Helen", "Henry", "Grace", "Jane", "Adam", "Ben", "Sam", "Lucy",
    "Eric", "Ryan", "Jason", "Martin", "Victoria", "William", "Richard", "Thomas", "Charles",
    "Joseph", "Patricia", "Jennifer", "Elizabeth", "Barbara", "Nancy", "Karen", "Betty",
    "Sandra", "Donna", "Carol", "Ruth", "Sharon", "Michelle", "Emily", "Kim", "Scott",
    "Jeff", "Gary", "Larry", "Justin", "Brandon", "Nathan", "Kyle", "Aaron", "Sean",
    "Anthony", "Jacob", "Nick", "Alex", "Max", "Leo", "Oscar", "Rose", "Julia", "Claire",
    "Diana", "Eva", "Ian", "Joe", "Dan", "Tim", "Matt", "Luke", "Carl", "Jim", "Bill",
)  # fmt: skip

GT_TEMPLATES = (
    "The {noun} lasted from the year {century}{start} to the year {century}",
    "The {noun} went on from the year {century}{start} until the year {century}",
    "The {noun} began in the year {century}{start} and ended in the year {century}",
)
GT_NOUNS = (
    "war", "expedition", "drought", "reign", "famine", "strike", "siege", "journey",
    "dynasty", "occupation", "rebellion", "voyage", "blockade", "plague", "crusade",
    "embargo", "migration", "revolt", "truce", "boom",
)  # fmt: skip
GT_CENTURIES = tuple(range(11, 18))
GT_STARTS = tuple(range(10, 90))  # tens digit 1..8: both later and earlier years exist


class IOITask(Task):
    name = "ioi"
    description = "Indirect object identification: 'When Mary and John went..., John gave a drink to' -> ' Mary'"
    metric = "logit_diff"
    metric_description = "logit of the indirect object minus logit of the subject"

    def examples(self, tokenizer: Any, n: int, rng: np.random.Generator) -> list[TaskExample]:
        names = [name for name in IOI_NAMES if single_token(tokenizer, f" {name}") is not None]
        if len(names) < 3:
            raise InvalidParamsError(
                "ioi needs names that are single tokens; this tokenizer writes "
                f"only {len(names)} of the {len(IOI_NAMES)} built-in names as one token"
            )
        out = []
        for i in range(n):
            template = IOI_TEMPLATES[rng.integers(len(IOI_TEMPLATES))]
            io, subject, third = (names[j] for j in rng.choice(len(names), 3, replace=False))
            place = IOI_PLACES[rng.integers(len(IOI_PLACES))]
            thing = IOI_THINGS[rng.integers(len(IOI_THINGS))]
            first, second = (io, subject) if i % 2 == 0 else (subject, io)  # ABBA / BABA
            slots = {"X": first, "Y": second, "place": place, "thing": thing}
            out.append(
                TaskExample(
                    prompt=template.format(S=subject, **slots),
                    answers=(f" {io}",),
                    distractors=(f" {subject}",),
                    corrupted=template.format(S=third, **slots),
                    where=f"example {i}",
                )
            )
        return out


class GreaterThanTask(Task):
    name = "greater-than"
    description = "Years: 'The war lasted from the year 1732 to the year 17' -> a year after 32"
    metric = "prob_diff"
    metric_description = (
        "probability on years after the start year minus before it (the two-digit year, "
        "or its tens digit where digits are single tokens)"
    )

    def examples(self, tokenizer: Any, n: int, rng: np.random.Generator) -> list[TaskExample]:
        mode = year_tokens(tokenizer)
        out = []
        for i in range(n):
            template = GT_TEMPLATES[rng.integers(len(GT_TEMPLATES))]
            noun = GT_NOUNS[rng.integers(len(GT_NOUNS))]
            century = GT_CENTURIES[rng.integers(len(GT_CENTURIES))]
            start = GT_STARTS[rng.integers(len(GT_STARTS))]
            later, earlier = later_and_earlier(start, mode)
            out.append(
                TaskExample(
                    prompt=template.format(noun=noun, century=century, start=f"{start:02d}"),
                    answers=later,
                    distractors=earlier,
                    corrupted=template.format(noun=noun, century=century, start="01"),
                    where=f"example {i}",
                )
            )
        return out


def year_tokens(tokenizer: Any) -> str:
    """ "two-digit" if every 00..99 is one token, "digit" if every 0..9 is, else an error."""
    if all(single_token(tokenizer, f"{y:02d}") is not None for y in range(100)):
        return "two-digit"
    if all(single_token(tokenizer, str(d)) is not None for d in range(10)):
        return "digit"
    raise InvalidParamsError(
        "greater-than needs years written as two-digit or one-digit tokens; this "
        "tokenizer writes neither"
    )


def later_and_earlier(start: int, mode: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Next-token strings that continue a later and an earlier year than `start`."""
    if mode == "two-digit":
        return (
            tuple(f"{y:02d}" for y in range(start + 1, 100)),
            tuple(f"{y:02d}" for y in range(start)),
        )
    tens = start // 10
    return tuple(str(d) for d in range(tens + 1, 10)), tuple(str(d) for d in range(tens))


@hookimpl
def register_tasks(register):
    register(IOITask())
    register(GreaterThanTask())
