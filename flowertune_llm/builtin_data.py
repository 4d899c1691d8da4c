"""The built-in instruction dataset: small, deterministic Alpaca-format tasks a tiny model can learn.

The shipped files `flowertune_llm/data/tiny_instructions.jsonl` (the clients' data) and
`tiny_instructions_heldout.jsonl` (the server's held-out set: other draws, none of them in the
clients' data) are the output of `python -m flowertune_llm.builtin_data`; a test regenerates them
and checks that they are unchanged.
Each task has a short rule-based answer, so a model with a few hundred thousand parameters
measurably lowers its loss on it within a few federated rounds.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

BUILTIN_DATASET_FILE = Path(__file__).parent / "data" / "tiny_instructions.jsonl"
BUILTIN_HELDOUT_FILE = Path(__file__).parent / "data" / "tiny_instructions_heldout.jsonl"
NUM_EXAMPLES = 1200
NUM_HELDOUT = 180
SEED = 20261124
HELDOUT_SEED = SEED + 1

WORDS = (
    "apple river garden window purple silver forest candle market planet bridge castle "
    "dragon engine flower guitar harbor island jacket kitten lemon mirror needle orange "
    "pencil rabbit saddle tiger velvet wagon yellow zebra anchor basket cactus desert "
    "falcon ginger hammer jungle ladder meadow nickel oyster parrot quartz rocket "
    "shadow tunnel violin walnut"
).split()

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark",
    "happy": "sad", "open": "closed", "early": "late", "full": "empty", "high": "low",
    "old": "young", "hard": "soft", "wet": "dry", "rich": "poor", "near": "far",
    "strong": "weak", "long": "short", "loud": "quiet", "clean": "dirty", "thick": "thin",
}

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "Poland": "Warsaw",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Chile": "Santiago",
    "Cuba": "Havana", "Sweden": "Stockholm", "Finland": "Helsinki", "Hungary": "Budapest",
}

Example = dict[str, str]


def _reverse_word(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}


def _uppercase(rng: random.Random) -> Example:
    text = " ".join(rng.sample(WORDS, rng.randint(2, 3)))
    return {"instruction": "Write the text in capital letters.", "input": text, "output": text.upper()}


def _add_numbers(rng: random.Random) -> Example:
    a, b = rng.randint(1, 49), rng.randint(1, 49)
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def _sort_numbers(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return {
        "instruction": "Sort the numbers from smallest to largest.",
        "input": ", ".join(map(str, numbers)),
        "output": ", ".join(map(str, sorted(numbers))),
    }


def _capital(rng: random.Random) -> Example:
    country = rng.choice(sorted(CAPITALS))
    return {
        "instruction": f"What is the capital of {country}?",
        "input": "",
        "output": f"The capital of {country} is {CAPITALS[country]}.",
    }


def _opposite(rng: random.Random) -> Example:
    word = rng.choice(sorted(OPPOSITES))
    return {"instruction": "Give the opposite of the word.", "input": word, "output": OPPOSITES[word]}


def _count_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(2, 7))
    return {
        "instruction": "How many words are in the sentence?",
        "input": " ".join(words),
        "output": str(len(words)),
    }


def _larger_number(rng: random.Random) -> Example:
    a, b = rng.sample(range(1, 100), 2)
    return {"instruction": "Which number is larger?", "input": f"{a} or {b}", "output": str(max(a, b))}


def _first_letter(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return {"instruction": "What is the first letter of the word?", "input": word, "output": word[0]}


TASKS: tuple[Callable[[random.Random], Example], ...] = (
    _reverse_word, _uppercase, _add_numbers, _sort_numbers, _capital,
    _opposite, _count_words, _larger_number, _first_letter,
)


def generate_examples(num_examples: int = NUM_EXAMPLES, seed: int = SEED) -> list[Example]:
    """Return `num_examples` Alpaca records, the same ones for the same seed."""
    rng = random.Random(seed)
    examples = []
    for index in range(num_examples):
        # Round-robin over tasks keeps every task equally frequent in any IID partition.
        task = TASKS[index % len(TASKS)]
        # The task name is a natural label for non-IID (Dirichlet) partitioning.
        examples.append({**task(rng), "category": task.__name__.lstrip("_")})
    return examples


def generate_heldout(num_examples: int = NUM_HELDOUT, seed: int = HELDOUT_SEED) -> list[Example]:
    """Return `num_examples` records of the same tasks, none of whose questions the clients' data asks."""
    seen = {(e["instruction"], e["input"]) for e in generate_examples()}
    candidates = generate_examples(20 * num_examples, seed)
    fresh = [e for e in candidates if (e["instruction"], e["input"]) not in seen]
    # Take the tasks in turn while they have fresh questions (the capital and opposite tasks have
    # none: every one of their few questions is in the clients' data).
    by_task: dict[str, list[Example]] = {}
    for example in fresh:
        by_task.setdefault(example["category"], []).append(example)
    ordered = []
    for turn in range(max(map(len, by_task.values()), default=0)):
        ordered.extend(group[turn] for group in by_task.values() if turn < len(group))
    return ordered[:num_examples]


def write_jsonl(examples: list[Example], path: Path) -> None:
    """Write records as JSON Lines, one sorted-key object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(example, sort_keys=True) + "\n")


if __name__ == "__main__":
    write_jsonl(generate_examples(), BUILTIN_DATASET_FILE)
    write_jsonl(generate_heldout(), BUILTIN_HELDOUT_FILE)
    print(f"Wrote {NUM_EXAMPLES} examples to {BUILTIN_DATASET_FILE}, {NUM_HELDOUT} to {BUILTIN_HELDOUT_FILE}")
