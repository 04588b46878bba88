"""Synthetic long-context tasks for the tiny quality-test model: generators, prompt format, scoring.

Four tasks, each a plain text prompt that ends in "Answer:" and a short answer that the model
writes after it as " " + answer + <|im_end|>:

    passkey   one "The pass key is 48213." in natural filler; decoy numbers with other labels
    multikey  RULER-style "special magic number" needles for several adjective-noun keys, some
              sharing a word with the asked key; asks for one of them
    kv        a dense list of "4f1c-a93e: 775102" records (no filler), near-miss keys sharing
              half of the asked key; asks for one value
    vt        RULER-style variable tracking: "VAR QZXTA = 48213." then "VAR MWLEP = VAR QZXTA."
              hops hidden in filler, next to distractor chains; asks for every name of the chain

Training, the periodic evaluation in train.py and later server runs all use these prompts, so a
sample is just text + answer. `Sample.prompt_ids` holds the prompt's token ids, assembled from
cached token ids of its pieces: every piece starts and ends at a pre-tokenizer boundary of our
tokenizer (spaces open a piece, newlines close it), so the concatenation equals encoding the
whole prompt (tests check this). Lengths are in tokens of the tokenizer handed to the generator.

Filler: our own paragraphs below plus eval/ruler_data/essay.txt, in a random paragraph order per
sample, with sentences carrying fresh random numbers mixed in so that the answer is never the
only number in sight.
"""

from __future__ import annotations

import argparse
import json
import re
import string
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from itertools import accumulate
from pathlib import Path
from random import Random

RULER_DATA = Path(__file__).resolve().parents[1] / "ruler_data"

ANSWER_PREFIX = "Answer:"
TASK_NAMES = ("passkey", "multikey", "kv", "vt")

# Generation budget per task (tokens, EOS included): the answer is " " + at most this minus one
# tokens. Prompts are built to leave this room inside `length`.
MAX_NEW_TOKENS = {"passkey": 10, "multikey": 10, "kv": 10, "vt": 32}
MIN_LENGTH = 256  # the shortest length every task fits (vt's three 5-line chains need ~230)

OWN_PARAGRAPHS = """\
The ferry across the northern sound makes eleven crossings a day in summer and only four in winter. Most of the passengers are regulars who know the crew by name and the best bench for avoiding the spray. On windy mornings the captain waits at the pier until the gusts settle, and nobody complains, because everyone has seen what the water can do. The old timetable is still pinned inside the cabin, yellowed and curling at the corners, although it has not matched the real schedule for years.
A clockmaker's bench is covered in tools so small that they look like toys. Each drawer holds a different size of screw, and the labels were written by a grandfather who never imagined they would still be read. Repairing a mantel clock can take a week, most of it spent cleaning parts that only need to be clean. The moment the pendulum swings evenly again is the reward, and the clockmaker usually lets it run for a few days before calling the owner.
Grafting an apple tree is a lesson in patience and trust. The grower cuts a thin branch from a tree she likes, shapes the end into a wedge, and fits it into a split in the trunk of a young rootstock. Then she wraps the joint, seals it with wax, and waits. If the two pieces grow together, the new tree will carry the same fruit as the old one for decades. Many of the varieties in the valley exist only because someone took the trouble to do this every spring.
The weather station on the ridge was built by volunteers who carried every beam up the path on their backs. For a long time it recorded only temperature and rain, written by hand in a ledger each evening. Later came a wind vane, a barometer, and finally a small radio that sent the readings down to the village. The volunteers still climb up once a month to clear the snow from the instruments and to replace whatever the storms have broken.
The reading room of the public library stays quiet even when every chair is taken. Students spread their notes across the long tables, retired teachers work through the newspapers, and a few people simply sit by the tall windows and watch the square. The librarians know which visitors want help and which want to be left alone. Behind the desk, the card catalog has been replaced by a screen, but the wooden drawers were kept because nobody could bear to throw them away.
In the bicycle workshop behind the station, broken frames hang from the ceiling like strange fruit. The mechanic strips each one down to bare metal, straightens what can be straightened, and paints it a color chosen by whoever happens to be in the shop that day. Children bring in bikes with flat tires and leave with a lesson in how to patch a tube themselves. The workshop makes very little money, but the town would feel smaller without it.
Every autumn the salt marsh fills with birds that have flown thousands of kilometers to rest there. Counting them is a job for early risers with cold hands and good binoculars. The counters walk the same path each year, stopping at the same posts, so that their numbers can be compared across decades. Some species have grown rare and others more common, and the long record is often the only way to tell a real change from a bad season.
The printing press in the museum still works, and on the first Sunday of the month a volunteer runs it for visitors. She sets the type by hand, letter by letter, reading the words backwards without any effort. The smell of ink fills the room as the first sheet comes off the press. Visitors are always surprised by how slow it is, and then by how beautiful the finished page looks when it is held up to the light.
Keeping bees teaches a person to move slowly and to pay attention to small signals. A calm hive hums at a low, steady pitch, while an angry one sounds sharp and uneven. Beekeepers learn to open the boxes on warm afternoons, when most of the workers are out in the fields. The honey harvest comes only at the end of summer, and a good keeper always leaves enough behind for the colony to survive the winter.
The harbor master keeps a tide table on the wall of his office and another in his head. He can tell from the color of the mud at the slipway whether the water is coming in or going out. Fishing boats plan their trips around his advice, and visitors who ignore it sometimes find their boats sitting on the sand at dawn. He has held the job for thirty years and says that the sea has never once done exactly what the table predicted.
The regional train stops at every village along the valley, even the ones where nobody ever gets on. Drivers wave to the farmers in the fields and slow down near the school so the children can see the engine. The line was nearly closed twice, and both times the villages raised enough money to keep it running. Today it carries more hikers than commuters, but the timetable has barely changed in half a century.
Dry stone walls cross the hillside in long gray lines that follow the shape of the land. They were built without mortar, each stone chosen to rest firmly on the ones below it. A skilled waller can look at a pile of rubble and see where every piece will go. The walls still keep sheep out of the meadows, and in many places they are older than any building in the village below.
"""

# Sentences with fresh random numbers: realistic distractors that look like answers.
NUMBER_SENTENCES = (
    "The harbor log for that winter lists {a} ships and {b} barrels of salt.",
    "By the spring of {year} the cooperative had {a} members.",
    "The road to the pass climbs {a} meters over {b} kilometers.",
    "A survey that year counted {a} households along the river.",
    "The station recorded {a} millimeters of rain in a single week.",
    "The library catalog now holds {a} titles.",
    "The bridge cost {a} coins to repair, a sum the council paid over {b} years.",
    "The factory shipped {a} crates in its busiest month.",
    "Her notebook gives the number {a} without saying what it counts.",
    "The archive reference for the letter is {a}.",
    "Someone had written {a} on the back of the old photograph.",
    "In {year} the mill employed {b} workers and sold {a} sacks of flour.",
    "The receipt was numbered {a} and dated {year}.",
    "The census of {year} lists {a} people in the district.",
)
# Labels of decoy numbers in the passkey task: the model has to find "pass key", not a number.
DECOY_LABELS = ("door code", "ticket number", "locker number", "account number", "pass code",
                "room number", "order number", "serial number")
NUMBER_SENTENCE_RATE = 0.08  # share of filler sentences that carry random numbers


# ---------------------------------------------------------------------------------- text units


@dataclass(frozen=True)
class Item:
    """A unit of context: a sentence (joined to the previous one by a space) or a line.

    `break_after` is "", "\\n" or "\\n\\n". `filler` items may be dropped to fit the budget.
    """

    text: str
    break_after: str = ""
    line: bool = False
    filler: bool = False


def render(items: Sequence[Item]) -> list[str]:
    """Text pieces of `items`: a space opens a piece, newlines close it (pre-token boundaries)."""
    pieces = []
    previous_break = "\n"  # the context follows the header's blank line
    for index, item in enumerate(items):
        next_is_line = index + 1 < len(items) and items[index + 1].line
        brk = item.break_after or ("\n" if item.line or next_is_line else "")
        pieces.append(("" if previous_break else " ") + item.text + brk)
        previous_break = brk
    return pieces


PieceEncoder = Callable[[str], Sequence[int]]


class TokenizerPieceEncoder:
    """Token ids of a text piece (no special tokens), cached: filler pieces repeat all the time.

    Pieces with digits (mostly unique) are not cached whole: every digit is a pre-token of its
    own, so the text between digits encodes separately (cached) and digits map straight to ids.
    That holds unless a run of 2+ spaces precedes a digit, which our texts never contain."""

    def __init__(self, tokenizer, cache_size: int = 1 << 16):  # a `tokenizers.Tokenizer`
        self.tokenizer = tokenizer
        self._cached = lru_cache(maxsize=cache_size)(self._encode)
        self._digit_ids = {digit: self._encode(digit) for digit in string.digits}

    def _encode(self, piece: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(piece, add_special_tokens=False).ids)

    def __call__(self, piece: str) -> tuple[int, ...]:
        if not _HAS_DIGIT.search(piece):
            return self._cached(piece)
        ids: list[int] = []
        for segment in _DIGIT_SPLIT.split(piece):
            if segment:
                ids += self._digit_ids.get(segment) or self._cached(segment)
        return tuple(ids)


_HAS_DIGIT = re.compile(r"\d")
_DIGIT_SPLIT = re.compile(r"(\d)")


def approximate_piece_encoder(piece: str) -> tuple[int, ...]:
    """Fake ids, one per ~4 characters: lets generators run before a tokenizer exists."""
    return (0,) * max(1, (len(piece) + 3) // 4)


# -------------------------------------------------------------------------------------- filler


def _split_sentences(paragraph: str) -> tuple[str, ...]:
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", paragraph.strip()) if s)


@cache
def filler_paragraphs() -> tuple[tuple[str, ...], ...]:
    essay = RULER_DATA.joinpath("essay.txt").read_text("utf-8").split("\n")
    paragraphs = [p for p in [*essay, *OWN_PARAGRAPHS.split("\n")] if p.strip()]
    return tuple(_split_sentences(p) for p in paragraphs)


@cache
def key_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    adjectives = tuple(RULER_DATA.joinpath("adjectives.txt").read_text("utf-8").split())
    nouns = tuple(RULER_DATA.joinpath("nouns.txt").read_text("utf-8").split())
    return adjectives, nouns


def random_number(rng: Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def number_sentence(rng: Random) -> str:
    digits = rng.choice((1, 2, 3, 4, 5, 5, 6, 6, 7))
    return rng.choice(NUMBER_SENTENCES).format(
        a=random_number(rng, digits), b=random_number(rng, rng.randint(1, 3)), year=rng.randint(1780, 1990)
    )


def filler_items(rng: Random, encode: PieceEncoder, budget: int) -> list[Item]:
    """Whole paragraphs in a random order (the first one entered at a random sentence), until
    `budget` tokens are used."""
    paragraphs = filler_paragraphs()
    items: list[Item] = []
    used = 0
    order: list[int] = []
    first = True
    while True:
        if not order:
            order = rng.sample(range(len(paragraphs)), len(paragraphs))
        sentences = paragraphs[order.pop()]
        start = rng.randrange(len(sentences)) if first else 0
        first = False
        for index in range(start, len(sentences)):
            units = [Item(sentences[index], "\n\n" if index == len(sentences) - 1 else "", filler=True)]
            if rng.random() < NUMBER_SENTENCE_RATE:
                units.insert(0, Item(number_sentence(rng), filler=True))
            for unit in units:
                cost = len(encode(" " + unit.text + unit.break_after))
                if used + cost > budget:
                    return items
                items.append(unit)
                used += cost


def place(items: list[Item], needles: Sequence[tuple[float, Item]], encode: PieceEncoder) -> list[Item]:
    """Insert each (depth, needle) before the first filler item with `depth` (0..1) of the filler
    tokens behind it. Positions come from the filler alone, and needles at the same position
    keep their order in `needles`, so a chain's hops stay in order."""
    starts = list(accumulate((len(encode(" " + item.text + item.break_after)) for item in items), initial=0))
    total = starts.pop()
    by_position: dict[int, list[Item]] = {}
    for depth, needle in needles:
        by_position.setdefault(bisect_left(starts, depth * total), []).append(needle)
    placed: list[Item] = []
    for index in range(len(items) + 1):
        placed += by_position.get(index, [])
        if index < len(items):
            placed.append(items[index])
    return placed


# -------------------------------------------------------------------------------------- sample


@dataclass(frozen=True)
class Sample:
    task: str
    prompt: str  # plain text ending in ANSWER_PREFIX
    answer: str  # the model should continue the prompt with completion(answer)
    length: int  # token budget: prompt tokens + MAX_NEW_TOKENS[task] <= length
    depth: float | None  # where the answer-bearing needle sits in the context, 0..1
    prompt_ids: tuple[int, ...]
    # More (question, answer) pairs about the same context, asked after the answer to `prompt`
    # (`follow_up_prompt`). Training only: one context then teaches several retrievals, and for
    # multikey / vt the contrast between keys of one context. Evaluation never asks them.
    follow_ups: tuple[tuple[str, str], ...] = ()

    def to_record(self, index: int) -> dict:
        """A RULER-suite-like jsonl record (`input` + `answer_prefix` is the prompt)."""
        return {
            "id": f"{self.task}-{self.length}-{index}",
            "task": self.task,
            "max_seq_length": self.length,
            "input": self.prompt[: -len(ANSWER_PREFIX)],
            "answer_prefix": ANSWER_PREFIX,
            "outputs": [self.answer],
            "tokens_to_generate": MAX_NEW_TOKENS[self.task],
            "length": len(self.prompt_ids) + MAX_NEW_TOKENS[self.task],
            "depth": self.depth,
        }


def completion(answer: str) -> str:
    """What the model writes after the prompt (before its end-of-turn token)."""
    return " " + answer


def follow_up_prompt(question: str) -> str:
    """The text after an answer's end token that asks another question about the same context."""
    return "\n\n" + question + "\n" + ANSWER_PREFIX


def context_of(sample: Sample) -> str:
    """The prompt up to its question: header and context."""
    return sample.prompt.rsplit("\n\nQuestion:", 1)[0]


def _with_follow_ups(sample: Sample, candidates: Sequence[tuple[str, str]], needle_texts: Sequence[str]) -> Sample:
    """`sample` with those candidate (question, answer) pairs whose needle text survived in its
    context (trimming to length drops kv records from the end)."""
    context = context_of(sample)
    kept = tuple(pair for pair, text in zip(candidates, needle_texts) if text in context)
    return replace(sample, follow_ups=kept)


class PromptDoesNotFit(ValueError):
    """A drawn sample's needles, header and question alone exceed its token budget (possible
    only near the shortest training lengths, for unlucky tokenizations)."""


def _assemble(task: str, header: str, items: list[Item], question: str, length: int, depth: float | None,
              answer: str, encode: PieceEncoder) -> Sample:
    """Render header + context + question, dropping filler from the end until it fits."""
    budget = length - MAX_NEW_TOKENS[task]
    items = list(items)
    while True:
        if items:  # the context ends in a blank line before the question
            items[-1] = replace(items[-1], break_after="\n\n")
        pieces = [header, *render(items), question + "\n" + ANSWER_PREFIX]
        ids = tuple(token for piece in pieces for token in encode(piece))
        if len(ids) <= budget:
            return Sample(task, "".join(pieces), answer, length, depth, ids)
        last_filler = max((i for i, item in enumerate(items) if item.filler), default=None)
        if last_filler is None:
            raise PromptDoesNotFit(f"{task}: {length} tokens cannot hold the prompt")
        del items[last_filler]


def _fixed_cost(encode: PieceEncoder, *pieces: str) -> int:
    return sum(len(encode(piece)) for piece in pieces) + 4  # + slack for joins; trimmed if short


# ------------------------------------------------------------------------------------- passkey

PASSKEY_HEADER = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n\n"
)
PASSKEY_QUESTION = "Question: What is the pass key?"


def passkey_sample(rng: Random, encode: PieceEncoder, length: int, depth: float | None = None) -> Sample:
    depth = rng.random() if depth is None else depth
    answer = random_number(rng, rng.randint(5, 7))
    needle = Item(f"The pass key is {answer}. Remember it.")
    decoys = [Item(f"The {label} is {random_number(rng, rng.randint(5, 7))}.")
              for label in rng.sample(DECOY_LABELS, rng.randint(1, 3))]
    budget = length - MAX_NEW_TOKENS["passkey"] - _fixed_cost(
        encode, PASSKEY_HEADER, PASSKEY_QUESTION, *(" " + n.text for n in [needle, *decoys]))
    items = place(filler_items(rng, encode, budget), [(rng.random(), d) for d in decoys] + [(depth, needle)], encode)
    return _assemble("passkey", PASSKEY_HEADER, items, PASSKEY_QUESTION, length, depth, answer, encode)


# ------------------------------------------------------------------------------------ multikey

MULTIKEY_HEADER = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards.\n\n"
)
MULTIKEY_NEEDLE = "One of the special magic numbers for {key} is: {value}."
MULTIKEY_QUESTION = "Question: What is the special magic number for {key} mentioned in the provided text?"


def _multikey_keys(rng: Random, count: int) -> list[str]:
    """Distinct adjective-noun keys; about half share a word with the first (the asked) key."""
    adjectives, nouns = key_words()
    first_adjective, first_noun = rng.choice(adjectives), rng.choice(nouns)
    keys = [f"{first_adjective}-{first_noun}"]
    while len(keys) < count:
        share = rng.random()
        adjective = first_adjective if share < 0.25 else rng.choice(adjectives)
        noun = first_noun if 0.25 <= share < 0.5 else rng.choice(nouns)
        key = f"{adjective}-{noun}"
        if key not in keys:
            keys.append(key)
    return keys


def multikey_sample(rng: Random, encode: PieceEncoder, length: int, depth: float | None = None, *,
                    num_keys: int | None = None) -> Sample:
    """`num_keys` needles (default: 2-6, drawn), the first one asked; the others are follow-ups."""
    depth = rng.random() if depth is None else depth
    keys = _multikey_keys(rng, rng.randint(2, 6) if num_keys is None else num_keys)
    values = [random_number(rng, 7) for _ in keys]
    needles = [Item(MULTIKEY_NEEDLE.format(key=key, value=value)) for key, value in zip(keys, values)]
    question = MULTIKEY_QUESTION.format(key=keys[0])
    budget = length - MAX_NEW_TOKENS["multikey"] - _fixed_cost(
        encode, MULTIKEY_HEADER, question, *(" " + n.text for n in needles))
    placements = [(depth, needles[0])] + [(rng.random(), needle) for needle in needles[1:]]
    items = place(filler_items(rng, encode, budget), placements, encode)
    sample = _assemble("multikey", MULTIKEY_HEADER, items, question, length, depth, values[0], encode)
    others = [(MULTIKEY_QUESTION.format(key=key), value) for key, value in zip(keys[1:], values[1:])]
    return _with_follow_ups(sample, others, [needle.text for needle in needles[1:]])


# ------------------------------------------------------------------------------------------ kv

KV_HEADER = (
    "Below is a list of records. Each line gives a key and its value. "
    "Find the value of the key in the question.\n\n"
)
KV_QUESTION = "Question: What is the value of key {key}?"
KV_NEAR_MISS_RATE = 0.2  # share of other keys that repeat one half of the asked key
KV_FOLLOW_UPS = 4  # training questions about other records of the same list


def _hex4(rng: Random) -> str:
    return f"{rng.getrandbits(16):04x}"


def kv_sample(rng: Random, encode: PieceEncoder, length: int, depth: float | None = None) -> Sample:
    depth = rng.random() if depth is None else depth
    key = f"{_hex4(rng)}-{_hex4(rng)}"
    answer = random_number(rng, 6)
    question = KV_QUESTION.format(key=key)
    budget = length - MAX_NEW_TOKENS["kv"] - _fixed_cost(encode, KV_HEADER, question)
    records: list[Item] = []
    pair_of: dict[str, tuple[str, str]] = {}  # record text -> (key, value), for the follow-ups
    keys = {key}
    used = len(encode(f"{key}: {answer}\n"))
    while True:
        near = rng.random()
        other = (f"{key[:4]}-{_hex4(rng)}" if near < KV_NEAR_MISS_RATE / 2 else
                 f"{_hex4(rng)}-{key[5:]}" if near < KV_NEAR_MISS_RATE else f"{_hex4(rng)}-{_hex4(rng)}")
        if other in keys:
            continue
        value = random_number(rng, 6)
        record = Item(f"{other}: {value}", line=True, filler=True)
        cost = len(encode(record.text + "\n"))
        if used + cost > budget:
            break
        keys.add(other)
        records.append(record)
        pair_of[record.text] = (other, value)
        used += cost
    position = round(depth * len(records))
    records.insert(position, Item(f"{key}: {answer}", line=True))
    sample = _assemble("kv", KV_HEADER, records, question, length, depth, answer, encode)
    # Records spread over the list (no random draws: held-out samples stay as they were).
    others = [records[round((i + 0.5) * len(records) / KV_FOLLOW_UPS)] for i in range(KV_FOLLOW_UPS)]
    others = [record.text for record in others if record.filler]
    pairs = [(KV_QUESTION.format(key=pair_of[text][0]), pair_of[text][1]) for text in others]
    return _with_follow_ups(sample, pairs, [text + "\n" for text in others])


# ------------------------------------------------------------------------------------------ vt

VT_HEADER = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."


def _variable_names(rng: Random, count: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names and name != "VAR":
            names.append(name)
    return names


def vt_sample(rng: Random, encode: PieceEncoder, length: int, depth: float | None = None) -> Sample:
    """The asked chain starts at `depth`; its later hops and the distractor chains (other values)
    go to random places after / anywhere, each chain in order."""
    depth = rng.random() if depth is None else depth
    hops, num_chains = rng.randint(2, 4), rng.randint(2, 3)
    names = _variable_names(rng, num_chains * (hops + 1))
    values = set()
    while len(values) < num_chains:
        values.add(random_number(rng, 5))
    chains = []
    # sorted() first: a set's order follows the per-process string hash seed.
    for chain_index, value in enumerate(sorted(sorted(values), key=lambda _: rng.random())):
        chain = names[chain_index * (hops + 1) : (chain_index + 1) * (hops + 1)]
        lines = [f"VAR {chain[0]} = {value}."] + [f"VAR {chain[i + 1]} = VAR {chain[i]}." for i in range(hops)]
        chains.append((chain, value, [Item(line, line=True) for line in lines]))
    question = VT_QUESTION.format(value=chains[0][1])
    budget = length - MAX_NEW_TOKENS["vt"] - _fixed_cost(
        encode, VT_HEADER, question, *(item.text + "\n\n" for _, _, lines in chains for item in lines))
    asked_depths = [depth, *sorted(rng.uniform(depth, 1.0) for _ in range(hops))]
    placements = list(zip(asked_depths, chains[0][2]))
    for _, _, lines in chains[1:]:
        placements += zip(sorted(rng.random() for _ in lines), lines)
    items = place(filler_items(rng, encode, budget), placements, encode)
    sample = _assemble("vt", VT_HEADER, items, question, length, depth, " ".join(chains[0][0]), encode)
    others = [(VT_QUESTION.format(value=value), " ".join(chain)) for chain, value, _ in chains[1:]]
    return _with_follow_ups(sample, others, [lines[0].text for _, _, lines in chains[1:]])


# -------------------------------------------------------------------------------------- public

GENERATORS = {"passkey": passkey_sample, "multikey": multikey_sample, "kv": kv_sample, "vt": vt_sample}


def answer_is_unambiguous(sample: Sample) -> bool:
    """The answer (for vt: the asked value and each name's assignment) occurs exactly once in the
    context, so a distractor can never be right by accident."""
    context = context_of(sample)
    if sample.task != "vt":
        return context.count(sample.answer) == 1
    value = re.search(r"assigned the value (\d+)", sample.prompt).group(1)
    return context.count(value) == 1 and all(context.count(f"VAR {name} =") == 1 for name in sample.answer.split())


MAX_DRAWS_THAT_DO_NOT_FIT = 64


def make_sample(task: str, rng: Random, encode: PieceEncoder, length: int, depth: float | None = None) -> Sample:
    """A sample of `task` fitting `length` tokens; redrawn (same rng, so still deterministic)
    in the rare cases a random filler number collides with the answer or the draw's needles do
    not fit (vt at 256 tokens, for unlucky tokenizations of its names: of all training runs so
    far, each drawing millions of samples, it stopped one). A length that keeps failing is an
    error."""
    misfits = 0
    while True:
        try:
            sample = GENERATORS[task](rng, encode, length, depth)
        except PromptDoesNotFit:
            misfits += 1
            if misfits == MAX_DRAWS_THAT_DO_NOT_FIT:
                raise
            continue
        if answer_is_unambiguous(sample):
            return sample


def sample_rng(seed: int, split: str, task: str, length: int, index: int) -> Random:
    """An independent stream per sample; `split` keeps held-out samples ("eval", "dev") apart
    from each other and from training (whose workers draw from streams of their own)."""
    return Random(f"tiny:{split}:{seed}:{task}:{length}:{index}")


def training_rng(seed: int, worker: int, salt: str = "") -> Random:
    """The stream a training data worker draws all its samples from."""
    return Random(f"tiny:train:{seed}:{worker}:{salt}")


def sample_id(task: str, length: int, index: int) -> str:
    """A held-out sample's id in every report: `task-length-index` (its cell, then its index)."""
    return f"{task}-{length}-{index}"


def cell_and_index(sample_id: str) -> tuple[str, int]:
    """`kv-8192-3` -> (`kv-8192`, 3): the cell (task-length) a sample id belongs to, and its index."""
    cell, index = sample_id.rsplit("-", 1)
    return cell, int(index)


def needle_depth(index: int, count: int) -> float:
    """Where held-out sample `index` of `count` per cell puts its needle (0: the context's
    start, 1: its end): spread evenly, so the same index names another prompt under another
    count (the same records and question, the needle elsewhere)."""
    return (index + 0.5) / count


def eval_samples(encode: PieceEncoder, tasks: Sequence[str], lengths: Sequence[int], count: int,
                 seed: int, split: str = "eval") -> dict[tuple[str, int], list[Sample]]:
    """Held-out samples per (task, length), needle depths spread evenly over the context."""
    return {
        (task, length): [
            make_sample(task, sample_rng(seed, split, task, length, index), encode, length,
                        depth=needle_depth(index, count))
            for index in range(count)
        ]
        for task in tasks
        for length in lengths
    }


# ------------------------------------------------------------------------------------- scoring


def extract_answer(generated: str) -> str:
    """The answer part of a generation: its first line, without surrounding spaces."""
    return generated.strip().split("\n", 1)[0].strip()


def exact_match(generated: str, answer: str) -> bool:
    return extract_answer(generated) == answer


# ----------------------------------------------------------------------------------------- CLI


def iter_records(encode: PieceEncoder, tasks: Sequence[str], lengths: Sequence[int], count: int,
                 seed: int) -> Iterator[dict]:
    for (task, length), samples in eval_samples(encode, tasks, lengths, count, seed).items():
        for index, sample in enumerate(samples):
            yield sample.to_record(index)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write held-out tiny-model task samples as jsonl.")
    parser.add_argument("--tokenizer", required=True, help="folder with tokenizer.json")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--samples", type=int, default=100, help="per task and length")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer

    encode = TokenizerPieceEncoder(Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for record in iter_records(encode, args.tasks, args.lengths, args.samples, args.seed):
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
