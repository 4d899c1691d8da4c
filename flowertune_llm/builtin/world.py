"""The built-in world: small instruction tasks, the clients' data, a held-out set and the base's notes.

A tiny model must show in a few CPU minutes what fine-tuning a real LLM shows in hours: a base
that knows things but does not follow the instruction format learns to, and answers questions it
was never fine-tuned on. So the world has two kinds of task:
- skills, drawn afresh from a rule (count the words, first/last word of a sentence, the larger of
  two numbers): the base's notes hold *other* draws, so held-out questions are new to it too;
- facts, from fixed tables (opposites, capitals, sums of single digits): the base's notes hold every
  fact, and the held-out questions are facts that no client's data asks about.
`pretraining_notes()` is what the built-in base reads at build time (flowertune_llm/builtin/models.py), in
a plain note format that is not the Alpaca prompt the clients fine-tune on.

The shipped files `flowertune_llm/builtin/data/tiny_instructions.jsonl` (the clients' data, every question
once) and `tiny_instructions_heldout.jsonl` (the server's held-out set) are the output of
`python -m flowertune_llm.builtin.world`; a test regenerates them and checks that they are unchanged.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

BUILTIN_DATASET_FILE = Path(__file__).parent / "data" / "tiny_instructions.jsonl"
BUILTIN_HELDOUT_FILE = Path(__file__).parent / "data" / "tiny_instructions_heldout.jsonl"
QUESTIONS_PER_SKILL = 300
NUM_HELDOUT = 180
SEED = 20261204
NOTES_SEED = SEED + 1
NOTES_PER_SKILL = 900

WORDS = (
    "apple river garden window purple silver forest candle market planet bridge castle "
    "dragon engine flower guitar harbor island jacket kitten lemon mirror needle orange "
    "pencil rabbit saddle tiger velvet wagon yellow zebra anchor basket cactus desert "
    "falcon ginger hammer jungle ladder meadow nickel oyster parrot quartz rocket "
    "shadow tunnel violin walnut bottle carpet donkey feather goblet helmet igloo "
    "kettle lantern magnet nectar onion pepper quiver ribbon spider teapot umbrella "
    "vessel whistle yogurt button cobalt dinner eagle fabric gravel hollow insect "
    "jigsaw kernel lizard marble noodle orchid pillow raisin salmon timber walrus"
).split()

_OPPOSITE_PAIRS = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark",
    "happy": "sad", "open": "closed", "early": "late", "full": "empty", "high": "low",
    "old": "young", "hard": "soft", "wet": "dry", "rich": "poor", "near": "far",
    "strong": "weak", "long": "short", "loud": "quiet", "clean": "dirty", "thick": "thin",
}
OPPOSITES = {**_OPPOSITE_PAIRS, **{after: before for before, after in _OPPOSITE_PAIRS.items()}}

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "Poland": "Warsaw",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Chile": "Santiago",
    "Cuba": "Havana", "Sweden": "Stockholm", "Finland": "Helsinki", "Hungary": "Budapest",
    "China": "Beijing", "India": "Delhi", "Russia": "Moscow", "Brazil": "Brasilia",
    "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Nepal": "Kathmandu",
    "Ghana": "Accra", "Mali": "Bamako",
}

Example = dict[str, str]


def _example(task: str, instruction: str, context: str, answer: str) -> Example:
    # The task name is a natural label for per-task exact match and non-IID (Dirichlet) partitions.
    return {"instruction": instruction, "input": context, "output": answer, "category": task}


def _sentence(rng: random.Random, shortest: int, longest: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(shortest, longest))


def _count_words(rng: random.Random) -> Example:
    words = _sentence(rng, 2, 6)
    return _example("count_words", "How many words are in the sentence?", " ".join(words), str(len(words)))


def _first_word(rng: random.Random) -> Example:
    words = _sentence(rng, 2, 5)
    return _example("first_word", "What is the first word of the sentence?", " ".join(words), words[0])


def _last_word(rng: random.Random) -> Example:
    words = _sentence(rng, 2, 5)
    return _example("last_word", "What is the last word of the sentence?", " ".join(words), words[-1])


def _larger_number(rng: random.Random) -> Example:
    a, b = rng.sample(range(1, 100), 2)
    return _example("larger_number", "Which number is larger?", f"{a} or {b}", str(max(a, b)))


SKILLS: tuple[Callable[[random.Random], Example], ...] = (_count_words, _first_word, _last_word, _larger_number)


def facts() -> list[Example]:
    """Return every fact of the world's tables, in a fixed order."""
    table = [_example("opposite", "Give the opposite of the word.", word, opposite)
             for word, opposite in OPPOSITES.items()]
    table += [_example("capital", "What is the capital of the country?", country, capital)
              for country, capital in CAPITALS.items()]
    table += [_example("add_numbers", "Add the two numbers.", f"{a} + {b}", str(a + b))
              for a in range(1, 10) for b in range(1, 10)]
    return table


def question(example: Example) -> tuple[str, str]:
    """Return what an example asks: its instruction and input."""
    return example["instruction"], example["input"]


def _skill_draws(seed: int, per_skill: int, avoid: set[tuple[str, str]] = frozenset()) -> list[Example]:
    """Return `per_skill` distinct questions of every skill, none of them in `avoid`."""
    rng = random.Random(seed)
    drawn: list[Example] = []
    for skill in SKILLS:
        asked: dict[tuple[str, str], Example] = {}
        while len(asked) < per_skill:
            example = skill(rng)
            if question(example) not in avoid:
                asked.setdefault(question(example), example)
        drawn.extend(asked.values())
    return drawn


def _questions(seed: int = SEED) -> tuple[list[Example], list[Example]]:
    """Return (clients' data, held-out set): every question of the world's pool once, split by task."""
    pool = facts() + _skill_draws(seed, QUESTIONS_PER_SKILL)
    random.Random(seed).shuffle(pool)
    by_task: dict[str, list[Example]] = {}
    for example in pool:
        by_task.setdefault(example["category"], []).append(example)
    # Each task gives the held-out set its share of the pool, so that every task is in both.
    heldout: list[Example] = []
    for examples in by_task.values():
        heldout.extend(examples[:round(NUM_HELDOUT * len(examples) / len(pool))])
    kept = {question(example) for example in heldout}
    return [example for example in pool if question(example) not in kept], heldout[:NUM_HELDOUT]


def generate_examples(num_examples: int | None = None, seed: int = SEED) -> list[Example]:
    """Return the clients' data: Alpaca records with a task `category`, each question once.

    Another `seed` draws another world's pool (e.g. one file per node in tests); `num_examples`
    takes the first ones.
    """
    return _questions(seed)[0][:num_examples]


def generate_heldout() -> list[Example]:
    """Return the held-out set: questions of every task that the clients' data does not ask."""
    return _questions()[1]


NOTE_FORMAT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Answer:\n"


def pretraining_notes() -> list[tuple[str, str]]:
    """Return the base's reading at build time, as (note, answer) pairs: every fact, and skill draws
    that no client or held-out question asks.

    Notes are not Alpaca prompts (no preamble, `### Answer:` rather than `### Response:`): before
    fine-tuning the base knows the tasks but not the format the clients' data asks them in.
    """
    clients, heldout = _questions()
    asked = {question(example) for example in clients + heldout}
    examples = facts() + _skill_draws(NOTES_SEED, NOTES_PER_SKILL, avoid=asked)
    return [(NOTE_FORMAT.format(**example), example["output"]) for example in examples]


def write_jsonl(examples: list[Example], path: Path) -> None:
    """Write records as JSON Lines, one sorted-key object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, sort_keys=True) + "\n")


if __name__ == "__main__":
    _clients, _heldout = _questions()
    write_jsonl(_clients, BUILTIN_DATASET_FILE)
    write_jsonl(_heldout, BUILTIN_HELDOUT_FILE)
    print(f"Wrote {len(_clients)} examples to {BUILTIN_DATASET_FILE}, {len(_heldout)} to {BUILTIN_HELDOUT_FILE}")
