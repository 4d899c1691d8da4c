"""Rows of each benchmark dataset, in its public schema, turned into prompts and gold answers.

The texts are the FlowerTune reference's (Flower's `benchmarks/flowertune-llm/evaluation/`): the
medical instructions come from Meditron's evaluation, the finance ones from FinGPT's, the code
prompts from the bigcode evaluation harness. They are reproduced word for word because a changed
prompt changes the score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MMLU_INSTRUCTION = "Answer the following multiple choice question."
PUBMEDQA_INSTRUCTION = (
    "As an expert doctor in clinical science and medical knowledge, can you tell me if the following "
    "statement is correct? Answer yes, no, or maybe."
)
MEDQA_INSTRUCTION = (
    "You are a medical doctor taking the US Medical Licensing Examination. You need to demonstrate your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, "
    "disease, patient care, and modes of therapy. Show your ability to apply the knowledge essential for "
    "medical practice. For the following multiple-choice question, select one correct answer from A to E. "
    "Base your answer on the current and standard practices referenced in medical guidelines."
)
# MedMCQA and CareQA share one instruction in the reference.
EXAM_INSTRUCTION = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying health, "
    "disease, patient care, and modes of therapy, answer the following multiple-choice question. Select "
    "one correct answer from A to D. Base your answer on the current and standard practices referenced "
    "in medical guidelines."
)
FINANCE_INSTRUCTION = (
    "What is the sentiment of this {tag}? Please choose an answer from {{negative/neutral/positive}}."
)

# FPB's and TFNS's integer labels (their dataset cards); the orders differ.
FPB_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TFNS_LABELS = {0: "negative", 1: "positive", 2: "neutral"}


@dataclass(frozen=True)
class Example:
    """One prompt to complete and what a right completion is judged against."""

    prompt: str
    gold: str
    # Code benchmarks: the test program appended to the completion, and where generation stops.
    tests: str = ""
    stop_words: tuple[str, ...] = field(default_factory=tuple)


class RowError(ValueError):
    """A row holds a value its dataset's schema does not allow (a label out of range)."""


def chat_wrapped(prompt: str) -> str:
    """Wrap a question in the ChatML-like markers the reference uses for MMLU and medical QA."""
    return f"<|im_start|>question\n{prompt}<|im_end|>\n<|im_start|>answer\n"


def multiple_choice(question: str, options: list[str]) -> str:
    """Return 'Question: ...?' and lettered options, as the reference formats every MCQ."""
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    lettered = "\n".join(f"{chr(65 + index)}. {option}" for index, option in enumerate(options))
    return f"Question: {question}\n\nOptions:\n{lettered}"


def _letter(index: int, count: int) -> str:
    """Return the letter of a 0-based option index, refusing one outside the options."""
    if not 0 <= index < count:
        raise RowError(f"answer index {index} is not one of the {count} options")
    return chr(65 + index)


def _answered(instruction: str, body: str) -> str:
    return f"{instruction}\n{body}\nThe answer is:\n"


def mmlu(row: dict[str, Any]) -> Example:
    """MMLU (lukaemon/mmlu schema: input, A, B, C, D, target)."""
    body = multiple_choice(str(row["input"]), [str(row[letter]) for letter in "ABCD"])
    return Example(_answered(MMLU_INSTRUCTION, body), str(row["target"]))


def pubmedqa(row: dict[str, Any]) -> Example:
    """PubMedQA (bigbio/pubmed_qa source schema: QUESTION, CONTEXTS, final_decision)."""
    body = "\n".join(row["CONTEXTS"]) + "\n" + str(row["QUESTION"])
    return Example(_answered(PUBMEDQA_INSTRUCTION, body), str(row["final_decision"]))


def medqa(row: dict[str, Any]) -> Example:
    """MedQA (bigbio/med_qa source schema: question, answer, options=[{key, value}])."""
    options = list(row["options"])
    body = multiple_choice(str(row["question"]), [str(option["value"]) for option in options])
    gold = next((str(option["key"]) for option in options if option["value"] == row["answer"]), None)
    if gold is None:
        raise RowError(f"answer {row['answer']!r} is none of the options")
    return Example(_answered(MEDQA_INSTRUCTION, body), gold)


def medmcqa(row: dict[str, Any]) -> Example:
    """MedMCQA (medmcqa schema: question, opa..opd, cop = 0-based answer)."""
    body = multiple_choice(str(row["question"]), [str(row[key]) for key in ("opa", "opb", "opc", "opd")])
    return Example(_answered(EXAM_INSTRUCTION, body), _letter(int(row["cop"]), 4))


def careqa(row: dict[str, Any]) -> Example:
    """CareQA (HPAI-BSC/CareQA schema: question, op1..op4, cop = 1-based answer)."""
    body = multiple_choice(str(row["question"]), [str(row[f"op{number}"]) for number in range(1, 5)])
    return Example(_answered(EXAM_INSTRUCTION, body), _letter(int(row["cop"]) - 1, 4))


def finance_prompt(instruction: str, text: str) -> str:
    """Return the reference's finance prompt (FinGPT's format)."""
    prompt = f"Instruction: {instruction}\n"
    if text:
        prompt += f"Input: {text}\n"
    return prompt + "Answer: "


def fpb(row: dict[str, Any]) -> Example:
    """Financial PhraseBank (takala/financial_phrasebank schema: sentence, label)."""
    label = int(row["label"])
    if label not in FPB_LABELS:
        raise RowError(f"label {label} is not one of {sorted(FPB_LABELS)}")
    return Example(finance_prompt(FINANCE_INSTRUCTION.format(tag="news"), str(row["sentence"])), FPB_LABELS[label])


def fiqa_label(score: float) -> str:
    """Return FiQA's sentiment from its score, with the reference's thresholds at -0.1 and 0.1."""
    return "negative" if score < -0.1 else "neutral" if score < 0.1 else "positive"


def fiqa(row: dict[str, Any]) -> Example:
    """FiQA 2018 (pauri32/fiqa-2018 schema: sentence, sentiment_score, format)."""
    tag = "tweet" if row["format"] == "post" else "news"
    return Example(
        finance_prompt(FINANCE_INSTRUCTION.format(tag=tag), str(row["sentence"])),
        fiqa_label(float(row["sentiment_score"])),
    )


def tfns(row: dict[str, Any]) -> Example:
    """Twitter Financial News Sentiment (zeroshot/twitter-financial-news-sentiment schema: text, label)."""
    label = int(row["label"])
    if label not in TFNS_LABELS:
        raise RowError(f"label {label} is not one of {sorted(TFNS_LABELS)}")
    return Example(finance_prompt(FINANCE_INSTRUCTION.format(tag="tweet"), str(row["text"])), TFNS_LABELS[label])


def mbpp(row: dict[str, Any]) -> Example:
    """MBPP (mbpp schema: text, test_list): the task and its first test as a docstring (InCoder's prompt)."""
    tests = list(row["test_list"])
    prompt = f'"""\n{row["text"]}\n{tests[0]}\n"""\n'
    stops = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
    return Example(prompt, "", tests="\n".join(tests), stop_words=stops)


def humaneval(row: dict[str, Any]) -> Example:
    """HumanEval (openai_humaneval schema: prompt, test, entry_point), prompt stripped as the harness does."""
    stops = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
    tests = f"\n{row['test']}\ncheck({row['entry_point']})"
    return Example(str(row["prompt"]).strip(), "", tests=tests, stop_words=stops)


def multipl_e(row: dict[str, Any]) -> Example:
    """MultiPL-E (nuprl/MultiPL-E schema: prompt, tests, stop_tokens), stopping at the row's own stop tokens."""
    return Example(
        str(row["prompt"]).strip(), "", tests=str(row["tests"]),
        stop_words=(*[str(word) for word in row["stop_tokens"]], "<file_sep>"),
    )
