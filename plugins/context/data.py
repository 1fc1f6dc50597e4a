"""Context-faithfulness data: examples, prompts, built-in sets and JSONL files.

An example is a context passage, a question about it, the answer the context
gives and (optionally) a competing `memory_answer`: what the model says from
memory, or a distractor. Every built-in set is generated from a seed:

- `counterfactual`: a memorised fact with its answer swapped ("The capital of
  France is Ottawa."), hidden among distracting sentences, some of which mention
  the memorised answer;
- `key-value`: codes for several doors; the question asks for one, the memory
  answer is another door's code;
- `proverbs`: MemoTrap-style forced endings: the context asks for a proverb to end
  in another word than the famous one.

The prompt format is fixed so that spans and answers line up:
`Context: {context}\\nQuestion: {question}\\nAnswer: {answer_prefix}`; answers are
scored as the continuation `" " + answer`. The context is the marked span.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from headscope.core.errors import InvalidParamsError
from headscope.core.jsonl import read_jsonl
from headscope.core.spans import CharSpan, MarkedPrompt, mark


class DatasetError(InvalidParamsError):
    """A dataset is empty, unknown or malformed."""


@dataclass(frozen=True)
class ContextExample:
    """One question whose answer must come from its context."""

    context: str
    question: str
    answer: str
    memory_answer: str | None = None
    answer_prefix: str = ""
    kind: str = "custom"
    group: str = ""  # examples of one group always land in the same split

    def prompt(self) -> str:
        tail = f" {self.answer_prefix}" if self.answer_prefix else ""
        return f"Context: {self.context}\nQuestion: {self.question}\nAnswer:{tail}"

    def context_span(self) -> CharSpan:
        start = len("Context: ")
        return CharSpan(start, start + len(self.context))

    def marked(self, handle) -> MarkedPrompt:
        return mark(handle, self.prompt(), [self.context_span()])

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------
# Counterfactual fact swaps
# --------------------------------------------------------------------------------------
# category: (question template, answer-prefix template, [(subject, memorised answer)]).
# Kept to facts SmolLM2-135M knows: asked without a context ("Question: ...\nAnswer:
# {prefix}"), the first token of the true answer outranks those of every other answer
# of its category, so a swapped answer contradicts what the model remembers.
FACTS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "capital": (
        "What is the capital of {s}?",
        "The capital of {s} is",
        [
            ("France", "Paris"),
            ("Italy", "Rome"),
            ("Japan", "Tokyo"),
            ("Germany", "Berlin"),
            ("Spain", "Madrid"),
            ("Russia", "Moscow"),
            ("Egypt", "Cairo"),
            ("China", "Beijing"),
            ("England", "London"),
            ("Greece", "Athens"),
            ("Canada", "Ottawa"),
            ("Australia", "Canberra"),
            ("Portugal", "Lisbon"),
            ("Ireland", "Dublin"),
            ("Austria", "Vienna"),
            ("Sweden", "Stockholm"),
            ("Norway", "Oslo"),
            ("India", "New Delhi"),
            ("Argentina", "Buenos Aires"),
            ("Kenya", "Nairobi"),
            ("Thailand", "Bangkok"),
            ("South Korea", "Seoul"),
            ("the Netherlands", "Amsterdam"),
            ("Belgium", "Brussels"),
            ("Denmark", "Copenhagen"),
            ("Finland", "Helsinki"),
            ("Hungary", "Budapest"),
            ("Peru", "Lima"),
            ("Cuba", "Havana"),
            ("Poland", "Warsaw"),
            ("Turkey", "Ankara"),
            ("Chile", "Santiago"),
            ("Colombia", "Bogota"),
            ("Vietnam", "Hanoi"),
            ("Indonesia", "Jakarta"),
            ("the Philippines", "Manila"),
            ("Iran", "Tehran"),
            ("Iraq", "Baghdad"),
            ("Syria", "Damascus"),
            ("Saudi Arabia", "Riyadh"),
            ("Afghanistan", "Kabul"),
            ("Pakistan", "Islamabad"),
            ("Scotland", "Edinburgh"),
            ("Wales", "Cardiff"),
            ("Iceland", "Reykjavik"),
            ("Ukraine", "Kyiv"),
            ("the Czech Republic", "Prague"),
            ("Romania", "Bucharest"),
            ("Bulgaria", "Sofia"),
            ("Serbia", "Belgrade"),
            ("Croatia", "Zagreb"),
            ("Ethiopia", "Addis Ababa"),
            ("Venezuela", "Caracas"),
            ("Malaysia", "Kuala Lumpur"),
            ("Nepal", "Kathmandu"),
            ("Jamaica", "Kingston"),
            ("New Zealand", "Wellington"),
            ("Mexico", "Mexico City"),
            ("Switzerland", "Bern"),
            ("Nigeria", "Abuja"),
            ("Morocco", "Rabat"),
            ("Lebanon", "Beirut"),
            ("Uruguay", "Montevideo"),
        ],
    ),
    "language": (
        "What language is mainly spoken in {s}?",
        "The main language spoken in {s} is",
        [
            ("Brazil", "Portuguese"),
            ("Mexico", "Spanish"),
            ("Germany", "German"),
            ("France", "French"),
            ("Japan", "Japanese"),
            ("Italy", "Italian"),
            ("Russia", "Russian"),
            ("Greece", "Greek"),
            ("the Netherlands", "Dutch"),
            ("Poland", "Polish"),
            ("Turkey", "Turkish"),
            ("Spain", "Spanish"),
            ("Portugal", "Portuguese"),
            ("China", "Chinese"),
            ("Korea", "Korean"),
            ("Hungary", "Hungarian"),
            ("Argentina", "Spanish"),
            ("Austria", "German"),
            ("Egypt", "Arabic"),
            ("Iran", "Persian"),
            ("Thailand", "Thai"),
            ("Vietnam", "Vietnamese"),
            ("Norway", "Norwegian"),
            ("England", "English"),
        ],
    ),
    "author": (
        "Who wrote {s}?",
        "{s} was written by",
        [
            ("Romeo and Juliet", "William Shakespeare"),
            ("Harry Potter", "J.K. Rowling"),
            ("Pride and Prejudice", "Jane Austen"),
            ("Nineteen Eighty-Four", "George Orwell"),
            ("The Odyssey", "Homer"),
            ("The Origin of Species", "Charles Darwin"),
            ("Hamlet", "William Shakespeare"),
            ("Macbeth", "William Shakespeare"),
            ("Oliver Twist", "Charles Dickens"),
            ("A Christmas Carol", "Charles Dickens"),
            ("Animal Farm", "George Orwell"),
            ("The Iliad", "Homer"),
            ("Don Quixote", "Miguel de Cervantes"),
            ("The Hobbit", "J.R.R. Tolkien"),
            ("The Lord of the Rings", "J.R.R. Tolkien"),
            ("Frankenstein", "Mary Shelley"),
            ("Dracula", "Bram Stoker"),
            ("The Adventures of Tom Sawyer", "Mark Twain"),
        ],
    ),
    "symbol": (
        "What is the chemical symbol for {s}?",
        "The chemical symbol for {s} is",
        [
            ("gold", "Au"),
            ("silver", "Ag"),
            ("iron", "Fe"),
            ("sodium", "Na"),
            ("oxygen", "O"),
            ("hydrogen", "H"),
            ("carbon", "C"),
            ("nitrogen", "N"),
            ("helium", "He"),
            ("copper", "Cu"),
            ("lead", "Pb"),
            ("potassium", "K"),
            ("calcium", "Ca"),
            ("mercury", "Hg"),
            ("tin", "Sn"),
            ("zinc", "Zn"),
        ],
    ),
    "currency": (
        "What is the currency of {s}?",
        "The currency of {s} is the",
        [
            ("Japan", "yen"),
            ("the United Kingdom", "pound"),
            ("Russia", "ruble"),
            ("China", "yuan"),
            ("Mexico", "peso"),
            ("the United States", "dollar"),
            ("India", "rupee"),
            ("Brazil", "real"),
            ("Germany", "euro"),
            ("France", "euro"),
            ("Canada", "dollar"),
            ("Thailand", "baht"),
        ],
    ),
    "landmark": (
        "In which city is {s}?",
        "{s} is in the city of",
        [
            ("the Eiffel Tower", "Paris"),
            ("the Colosseum", "Rome"),
            ("the Statue of Liberty", "New York"),
            ("Big Ben", "London"),
            ("the Kremlin", "Moscow"),
            ("the Brandenburg Gate", "Berlin"),
            ("the Sydney Opera House", "Sydney"),
            ("the Acropolis", "Athens"),
            ("the Louvre", "Paris"),
            ("the Vatican", "Rome"),
            ("Times Square", "New York"),
            ("the Tower of London", "London"),
            ("the Golden Gate Bridge", "San Francisco"),
            ("the Hollywood sign", "Los Angeles"),
            ("the Taj Mahal", "Agra"),
            ("the Forbidden City", "Beijing"),
            ("the Sagrada Familia", "Barcelona"),
            ("the Parthenon", "Athens"),
            ("Buckingham Palace", "London"),
        ],
    ),
    "continent": (
        "On which continent is {s}?",
        "{s} is on the continent of",
        [
            ("Egypt", "Africa"),
            ("Japan", "Asia"),
            ("France", "Europe"),
            ("Kenya", "Africa"),
            ("Canada", "North America"),
            ("Germany", "Europe"),
            ("Argentina", "South America"),
            ("Brazil", "South America"),
            ("China", "Asia"),
            ("India", "Asia"),
            ("Italy", "Europe"),
            ("Nigeria", "Africa"),
            ("Mexico", "North America"),
            ("Peru", "South America"),
            ("Spain", "Europe"),
            ("Morocco", "Africa"),
            ("Thailand", "Asia"),
            ("Chile", "South America"),
            ("the United States", "North America"),
        ],
    ),
    "colour": (
        "What colour is {s}?",
        "The colour of {s} is",
        [
            ("the sky on a clear day", "blue"),
            ("snow", "white"),
            ("coal", "black"),
            ("a ripe tomato", "red"),
            ("milk", "white"),
            ("blood", "red"),
        ],
    ),
    "opposite": (
        "What is the opposite of {s}?",
        "The opposite of {s} is",
        [
            ("hot", "cold"),
            ("up", "down"),
            ("big", "small"),
            ("day", "night"),
            ("fast", "slow"),
            ("happy", "sad"),
            ("open", "closed"),
            ("light", "dark"),
            ("young", "old"),
            ("early", "late"),
        ],
    ),
    "painter": (
        "Who painted {s}?",
        "{s} was painted by",
        [
            ("the Mona Lisa", "Leonardo da Vinci"),
            ("The Starry Night", "Vincent van Gogh"),
            ("Guernica", "Pablo Picasso"),
            ("The Last Supper", "Leonardo da Vinci"),
            ("the Sistine Chapel ceiling", "Michelangelo"),
            ("Sunflowers", "Vincent van Gogh"),
        ],
    ),
}

FILLER = [
    "The weather was mild that week and many visitors came to the old market.",
    "A small boat drifted across the lake while the sun set behind the hills.",
    "The committee agreed to meet again next week to discuss the new budget.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Our train was delayed for an hour because of snow on the tracks.",
    "In the library, a quiet student turned the pages of an ancient map.",
    "The orchestra tuned their instruments as the audience took their seats.",
    "Scientists measured the temperature of the ocean at twelve different depths.",
    "He forgot his umbrella at the station and had to walk home in the rain.",
    "The children built a sandcastle and decorated it with shells.",
    "A new bakery opened on the corner and sold out of bread by noon.",
    "The museum extended its opening hours for the summer exhibition.",
]

# Distractors that mention the memorised answer without restating the fact.
MENTIONS = [
    "Many people have heard of {m}.",
    "{m} is often mentioned in books and films.",
    "Some visitors asked the guide about {m}.",
]


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def fact_bank() -> list[dict]:
    """Every built-in fact: category, subject, question, answer prefix, answer."""
    facts = []
    for category, (question, prefix, pairs) in FACTS.items():
        for subject, answer in pairs:
            facts.append(
                {
                    "category": category,
                    "subject": subject,
                    "question": question.format(s=subject),
                    "prefix": _capitalise(prefix.format(s=subject)),
                    "answer": answer,
                    "choices": sorted({a for _, a in pairs} - {answer}),
                }
            )
    return facts


def counterfactual_swaps(n: int, seed: int, n_distractors: int = 3) -> list[ContextExample]:
    """Facts with swapped answers among `n_distractors` distracting sentences.

    Each fact is used once before any is reused (with a new swap and new
    distractors); a fact's examples share a group, so they never straddle splits.
    """
    rng = random.Random(seed)
    bank = fact_bank()
    order: list[int] = []
    while len(order) < n:
        block = list(range(len(bank)))
        rng.shuffle(block)
        order += block
    examples = []
    for index in order[:n]:
        fact = bank[index]
        swapped = rng.choice(fact["choices"])
        sentences = rng.sample(FILLER, n_distractors)
        if rng.random() < 0.5:
            sentences[0] = rng.choice(MENTIONS).format(m=fact["answer"])
            sentences[0] = _capitalise(sentences[0])
        sentences.insert(rng.randrange(len(sentences) + 1), f"{fact['prefix']} {swapped}.")
        examples.append(
            ContextExample(
                context=" ".join(sentences),
                question=fact["question"],
                answer=swapped,
                memory_answer=fact["answer"],
                answer_prefix=fact["prefix"],
                kind="counterfactual",
                group=f"fact:{fact['category']}:{fact['subject']}",
            )
        )
    return examples


# --------------------------------------------------------------------------------------
# Key-value retrieval with distractors
# --------------------------------------------------------------------------------------
DOORS = [
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "silver",
    "golden",
    "wooden",
    "iron",
]


def key_value_retrieval(n: int, seed: int, n_pairs: int = 6) -> list[ContextExample]:
    """Four-digit codes for `n_pairs` doors; ask for one. The memory answer is the
    code of the door listed next to it (the nearest distractor)."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        doors = rng.sample(DOORS, n_pairs)
        codes = rng.sample(range(1000, 10000), n_pairs)
        target = rng.randrange(n_pairs)
        neighbour = target + 1 if target + 1 < n_pairs else target - 1
        context = " ".join(
            f"The code for the {door} door is {code}."
            for door, code in zip(doors, codes, strict=True)
        )
        examples.append(
            ContextExample(
                context=context,
                question=f"What is the code for the {doors[target]} door?",
                answer=str(codes[target]),
                memory_answer=str(codes[neighbour]),
                answer_prefix=f"The code for the {doors[target]} door is",
                kind="key-value",
                group=f"kv:{i}",
            )
        )
    return examples


# --------------------------------------------------------------------------------------
# MemoTrap-style forced proverb endings
# --------------------------------------------------------------------------------------
# (proverb without its last word, the famous last word); SmolLM2-135M completes each.
PROVERBS = [
    ("Actions speak louder than", "words"),
    ("All that glitters is not", "gold"),
    ("An apple a day keeps the doctor", "away"),
    ("Beauty is in the eye of the", "beholder"),
    ("Better late than", "never"),
    ("Birds of a feather flock", "together"),
    ("Don't judge a book by its", "cover"),
    ("Every cloud has a silver", "lining"),
    ("Honesty is the best", "policy"),
    ("Practice makes", "perfect"),
    ("The early bird catches the", "worm"),
    ("The pen is mightier than the", "sword"),
    ("Two wrongs don't make a", "right"),
    ("A picture is worth a thousand", "words"),
    ("Curiosity killed the", "cat"),
    ("Rome wasn't built in a", "day"),
    ("Laughter is the best", "medicine"),
    ("Out of sight, out of", "mind"),
    ("The grass is always greener on the other", "side"),
    ("A penny saved is a penny", "earned"),
    ("Haste makes", "waste"),
    ("No pain, no", "gain"),
    ("Slow and steady wins the", "race"),
    ("Necessity is the mother of", "invention"),
    ("Strike while the iron is", "hot"),
    ("Easy come, easy", "go"),
    ("Great minds think", "alike"),
    ("Old habits die", "hard"),
]

FORCED_ENDINGS = [
    "apples",
    "music",
    "rivers",
    "candles",
    "thunder",
    "pencils",
    "gardens",
    "mirrors",
    "bread",
    "stones",
    "clouds",
    "ladders",
]


def proverb_endings(n: int, seed: int) -> list[ContextExample]:
    """Proverbs the context asks to end with an unusual word (MemoTrap)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n:
        block = list(range(len(PROVERBS)))
        rng.shuffle(block)
        order += block
    examples = []
    for index in order[:n]:
        start, famous = PROVERBS[index]
        forced = rng.choice(FORCED_ENDINGS)
        examples.append(
            ContextExample(
                context=f'Write a quote that ends in the word "{forced}".',
                question=f"Complete the quote: {start} ...",
                answer=forced,
                memory_answer=famous,
                answer_prefix=start,
                kind="proverbs",
                group=f"proverb:{index}",
            )
        )
    return examples


BUILTIN_DATASETS = {
    "counterfactual": counterfactual_swaps,
    "key-value": key_value_retrieval,
    "proverbs": proverb_endings,
}


# --------------------------------------------------------------------------------------
# User datasets, selection and splits
# --------------------------------------------------------------------------------------
REQUIRED = ("context", "question", "answer")
OPTIONAL = ("memory_answer", "answer_prefix")


def load_jsonl(path: str | Path) -> list[ContextExample]:
    """Examples from a JSONL file: one object per line with `context`, `question`,
    `answer` and optional `memory_answer` and `answer_prefix`."""
    examples = []
    for where, row in read_jsonl(path, "dataset file", DatasetError):
        missing = [k for k in REQUIRED if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            raise DatasetError(f"{where} lacks non-empty string field(s): {', '.join(missing)}")
        for key in OPTIONAL:
            if row.get(key) is not None and not isinstance(row[key], str):
                raise DatasetError(f"{where}: {key} must be a string")
        examples.append(
            ContextExample(
                context=row["context"],
                question=row["question"],
                answer=row["answer"].strip(),
                memory_answer=(row.get("memory_answer") or "").strip() or None,
                answer_prefix=(row.get("answer_prefix") or "").strip(),
                kind="jsonl",
                group=where,
            )
        )
    if not examples:
        raise DatasetError(f"dataset {path} has no examples")
    return examples


def load_dataset(name: str, n: int, seed: int) -> list[ContextExample]:
    """A built-in set by name (generated from `seed`), or a JSONL file (first `n`)."""
    if n < 1:
        raise DatasetError("the dataset needs at least one example (n_examples >= 1)")
    if name in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[name](n, seed)
    if name.endswith(".jsonl") or Path(name).is_file():
        return load_jsonl(name)[:n]
    raise DatasetError(
        f"unknown dataset {name!r}: use {', '.join(BUILTIN_DATASETS)} or a .jsonl file"
    )


def split(
    examples: Sequence[ContextExample], calibration_fraction: float, seed: int
) -> tuple[list[ContextExample], list[ContextExample]]:
    """(calibration, held-out), split by group so no fact or proverb is in both."""
    groups = sorted({e.group for e in examples})
    if len(groups) < 2:
        raise DatasetError(
            f"{len(examples)} example(s) in {len(groups)} group(s) cannot be split into "
            "calibration and held-out parts; give more examples"
        )
    random.Random(seed).shuffle(groups)
    n_cal = min(max(1, round(calibration_fraction * len(groups))), len(groups) - 1)
    calibration = set(groups[:n_cal])
    cal = [e for e in examples if e.group in calibration]
    held = [e for e in examples if e.group not in calibration]
    return cal, held


# --------------------------------------------------------------------------------------
# Neutral text for the fluency guard
# --------------------------------------------------------------------------------------
# (first part, marked as context; continuation, scored)
NEUTRAL_TEXTS = [
    (
        "The village sat at the foot of a green hill, where a narrow river turned twice.",
        "Every morning the baker opened his shop before sunrise, and the smell of warm "
        "bread drifted down the main street towards the old stone bridge.",
    ),
    (
        "Last spring the town council decided to plant trees along the main road.",
        "Volunteers came every weekend with shovels and buckets, and by the end of May "
        "more than two hundred young oaks and maples lined both sides of the street.",
    ),
    (
        "The museum's new hall is devoted to the history of clocks and calendars.",
        "Visitors can follow the story from simple sundials and water clocks to the "
        "precise mechanical watches that sailors once carried across the oceans.",
    ),
    (
        "Our school library was moved to a bright room on the second floor.",
        "The students helped to carry the books, sort them by subject and paint the "
        "shelves, and the librarian thanked everyone with tea and biscuits.",
    ),
    (
        "Bees play an important role in the life of many flowering plants.",
        "As they move from flower to flower collecting nectar, they carry pollen that "
        "helps the plants produce seeds and fruit for the following season.",
    ),
    (
        "The train left the city early in the morning under a grey sky.",
        "By the time it reached the coast the clouds had cleared, and the passengers "
        "could see fishing boats returning to the harbour with their catch.",
    ),
    (
        "Learning to play the piano takes patience and regular practice.",
        "Most teachers suggest short daily sessions rather than long ones once a week, "
        "because the hands and the memory improve a little every day.",
    ),
    (
        "The old lighthouse on the island was restored by a group of volunteers.",
        "They repaired the stairs, replaced the broken windows and painted the tower "
        "white and red again, so that ships can see it from far away.",
    ),
]
