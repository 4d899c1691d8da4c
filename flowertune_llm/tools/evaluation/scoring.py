"""Answer extraction and scores, written to give the FlowerTune reference evaluation's numbers.

The reference (Flower's `benchmarks/flowertune-llm/evaluation/`) lower-cases a multiple-choice or
yes/no output, keeps its first letter (or its yes/no word) and compares it with the gold answer
as a string; finance outputs are mapped to a sentiment by substring; code is scored pass@1.
Each quirk that changes a score is kept on purpose and named where it happens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# What the reference accepts as an extracted answer; anything else falls back to the whole output.
ACCEPTED_ANSWERS = ("a", "b", "c", "d", "e", "yes", "no")
SENTIMENTS = ("negative", "neutral", "positive")


def _ascii(text: str) -> str:
    """Drop non-ASCII characters, as the reference's `clean_answer` does."""
    return text.encode("ascii", "ignore").decode("ascii")


def _boolean(text: str) -> str:
    """Collapse a doubled yes/no ('yesyes', 'yesno') to the first word, as the reference does."""
    for doubled, single in (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"), ("noyes", "no")):
        if doubled in text:
            return _ascii(text.replace(doubled, single))
    return _ascii(text)


def extract_choice(output: str, answer_type: str) -> str:
    """Return the answer the reference reads from a lower-cased output ('mcq' or 'boolean').

    The output's first letter for 'mcq', its yes/no word for 'boolean'; when that is not one of
    ACCEPTED_ANSWERS the whole output is returned unchanged, so it can still equal a gold answer
    such as 'maybe' (PubMedQA's third class is only ever matched this way).
    """
    text = output
    # A markdown-style "\n## answer" section: the reference reads the line after it.
    if "\n##" in text:
        text = text.split("\n##")[1].split("\n")[0].strip().lower()
    text = re.sub(" +", " ", re.sub(r"[^a-zA-Z0-9]", " ", text).strip())
    if answer_type == "boolean":
        text = _boolean(text)
    elif answer_type == "mcq":
        text = _ascii(text)[:1]
    return text if text in ACCEPTED_ANSWERS else output


def choice_is_correct(output: str, gold: str, answer_type: str) -> bool:
    """Return whether a generated answer counts as the gold one (both compared lower-cased)."""
    return extract_choice(output.lower(), answer_type) == gold.lower()


def finance_answer(decoded: str) -> str:
    """Return the text after the prompt's 'Answer: ' in a decoded prompt+generation, or 'None'.

    The reference splits the whole decoded sequence on 'Answer: ' and keeps the second piece, so
    a second 'Answer: ' in the generation cuts the answer there.
    """
    pieces = decoded.split("Answer: ")
    return pieces[1] if len(pieces) > 1 else "None"


def sentiment(text: str) -> str:
    """Map text to a sentiment: 'positive' if it says so, else 'negative' if it says so, else 'neutral'."""
    if "positive" in text or "Positive" in text:
        return "positive"
    if "negative" in text or "Negative" in text:
        return "negative"
    return "neutral"


def sentiment_is_correct(answer: str, gold: str) -> bool:
    """Return whether an answer's sentiment is the gold label's (both mapped by `sentiment`)."""
    return sentiment(answer) == sentiment(gold)


def stop_at_stop_words(completion: str, stop_words: Sequence[str]) -> str:
    """Return the completion up to the first occurrence of any stop word (the bigcode harness's cut)."""
    cut = len(completion)
    for word in stop_words:
        index = completion.find(word)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]


def accuracy(correct: Sequence[bool]) -> float:
    """Return the fraction of correct answers (0.0 for none)."""
    return sum(correct) / len(correct) if correct else 0.0


def suite_average(scores: Sequence[float]) -> float:
    """Return the unweighted mean of a suite's dataset scores: what the leaderboard ranks by."""
    return sum(scores) / len(scores) if scores else 0.0
