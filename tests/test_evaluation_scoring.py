"""Answer extraction, prompts and scores of every suite, on hand-written outputs with known answers."""

from __future__ import annotations

import pytest

from flowertune_llm.tools.evaluation import prompts, scoring
from flowertune_llm.tools.evaluation.prompts import RowError


@pytest.mark.parametrize(
    ("output", "gold", "correct"),
    [
        ("B", "B", True),
        (" b) the second option", "B", True),
        ("(c)", "C", True),
        ("d.", "D", True),
        ("E", "E", True),  # MedQA's instruction offers A to E; 'e' is accepted
        ("A", "B", False),
        # First letter of the output: a sentence is read as its first word's first letter.
        ("The answer is B", "B", False),
        ("the answer is b", "T", False),
        ("", "A", False),
        ("1", "A", False),
        ("Ｂ", "B", False),  # a full-width letter is dropped as non-ASCII
        # A "\n##" section: the line after it is read.
        ("blah\n## c\nmore", "C", True),
    ],
)
def test_multiple_choice_extraction(output: str, gold: str, correct: bool) -> None:
    assert scoring.choice_is_correct(output, gold, "mcq") is correct


@pytest.mark.parametrize(
    ("output", "gold", "correct"),
    [
        ("yes", "yes", True),
        ("Yes.", "yes", True),
        ("no", "no", True),
        ("yesno", "yes", True),
        ("noyes", "no", True),
        ("nono", "no", True),
        ("no", "yes", False),
        # 'maybe' is not an accepted answer: the whole (lower-cased) output must equal the gold.
        ("maybe", "maybe", True),
        ("Maybe", "maybe", True),
        (" maybe", "maybe", False),
        ("maybe.", "maybe", False),
        ("yes, no", "yes", False),
    ],
)
def test_yes_no_extraction(output: str, gold: str, correct: bool) -> None:
    assert scoring.choice_is_correct(output, gold, "boolean") is correct


def test_unaccepted_extraction_returns_the_whole_output() -> None:
    assert scoring.extract_choice("the answer", "mcq") == "the answer"
    assert scoring.extract_choice(" b ", "mcq") == "b"


@pytest.mark.parametrize(
    ("decoded", "answer"),
    [
        ("Instruction: x\nInput: y\nAnswer: positive", "positive"),
        ("Instruction: x\nAnswer: neutral Answer: positive", "neutral "),
        ("Instruction: x\nInput: y\n", "None"),
    ],
)
def test_finance_answer_is_the_text_after_answer(decoded: str, answer: str) -> None:
    assert scoring.finance_answer(decoded) == answer


@pytest.mark.parametrize(
    ("answer", "gold", "correct"),
    [
        ("positive", "positive", True),
        ("Positive.", "positive", True),
        ("negative outlook", "negative", True),
        # 'positive' wins over 'negative' when both appear.
        ("not positive, rather negative", "negative", False),
        # Anything without either word is 'neutral', an unparsable output included.
        ("None", "neutral", True),
        ("I cannot tell", "neutral", True),
        ("NEGATIVE", "negative", False),
    ],
)
def test_sentiment_scoring(answer: str, gold: str, correct: bool) -> None:
    assert scoring.sentiment_is_correct(answer, gold) is correct


def test_accuracy_and_suite_average() -> None:
    assert scoring.accuracy([True, False, True, True]) == 0.75
    assert scoring.accuracy([]) == 0.0
    # The leaderboard's average: the unweighted mean of the datasets' scores.
    assert scoring.suite_average([0.5, 0.25, 0.0]) == pytest.approx(0.25)


def test_stop_at_first_stop_word() -> None:
    completion = "    return a + b\nprint(add(1, 2))\nassert x\n"
    assert scoring.stop_at_stop_words(completion, ("\nassert", "\nprint")) == "    return a + b"
    assert scoring.stop_at_stop_words("no stop", ("\nclass",)) == "no stop"


def test_mmlu_prompt_is_the_reference_text() -> None:
    example = prompts.mmlu({"input": "What is 2+2", "A": "3", "B": "4", "C": "5", "D": "6", "target": "B"})
    assert example.prompt == (
        "Answer the following multiple choice question.\nQuestion: What is 2+2?\n\nOptions:\n"
        "A. 3\nB. 4\nC. 5\nD. 6\nThe answer is:\n"
    )
    assert example.gold == "B"
    # A question ending in '.' or '?' gets no extra '?'.
    assert "Question: Pick one.\n" in prompts.mmlu({"input": "Pick one.", "A": "", "B": "", "C": "", "D": "", "target": "A"}).prompt
    assert prompts.chat_wrapped("Q") == "<|im_start|>question\nQ<|im_end|>\n<|im_start|>answer\n"


def test_medical_golds_follow_each_schema() -> None:
    assert prompts.medmcqa({"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 2}).gold == "C"
    assert prompts.careqa({"question": "q", "op1": "a", "op2": "b", "op3": "c", "op4": "d", "cop": 1}).gold == "A"
    medqa = prompts.medqa({
        "question": "q", "answer": "beta",
        "options": [{"key": "A", "value": "alpha"}, {"key": "B", "value": "beta"}],
    })
    assert medqa.gold == "B" and "A. alpha\nB. beta" in medqa.prompt
    pubmed = prompts.pubmedqa({"QUESTION": "Is it?", "CONTEXTS": ["c1", "c2"], "final_decision": "maybe"})
    assert pubmed.prompt == prompts.PUBMEDQA_INSTRUCTION + "\nc1\nc2\nIs it?\nThe answer is:\n"
    assert pubmed.gold == "maybe"


@pytest.mark.parametrize(
    ("convert", "row"),
    [
        (prompts.medmcqa, {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 4}),
        (prompts.careqa, {"question": "q", "op1": "a", "op2": "b", "op3": "c", "op4": "d", "cop": 0}),
        (prompts.medqa, {"question": "q", "answer": "z", "options": [{"key": "A", "value": "a"}]}),
        (prompts.fpb, {"sentence": "s", "label": 3}),
    ],
)
def test_rows_outside_the_schema_are_refused(convert, row) -> None:
    with pytest.raises(RowError):
        convert(row)


def test_finance_labels_and_prompts() -> None:
    fpb = prompts.fpb({"sentence": "Profit rose.", "label": 2})
    assert fpb.gold == "positive"
    assert fpb.prompt == (
        "Instruction: What is the sentiment of this news? Please choose an answer from "
        "{negative/neutral/positive}.\nInput: Profit rose.\nAnswer: "
    )
    # TFNS orders its labels differently from FPB.
    assert prompts.tfns({"text": "t", "label": 1}).gold == "positive"
    assert prompts.tfns({"text": "t", "label": 2}).gold == "neutral"
    assert "this tweet?" in prompts.fiqa({"sentence": "s", "sentiment_score": 0.5, "format": "post"}).prompt
    assert "this news?" in prompts.fiqa({"sentence": "s", "sentiment_score": 0.5, "format": "headline"}).prompt


@pytest.mark.parametrize(("score", "label"), [(-0.2, "negative"), (-0.1, "neutral"), (0.05, "neutral"), (0.1, "positive")])
def test_fiqa_thresholds(score: float, label: str) -> None:
    assert prompts.fiqa_label(score) == label


def test_code_prompts_and_tests() -> None:
    mbpp = prompts.mbpp({"text": "Add two numbers.", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]})
    assert mbpp.prompt == '"""\nAdd two numbers.\nassert add(1, 2) == 3\n"""\n'
    assert mbpp.tests == "assert add(1, 2) == 3\nassert add(0, 0) == 0"
    human = prompts.humaneval({"prompt": "def f():\n    \n", "test": "def check(c):\n    assert c() == 1", "entry_point": "f"})
    assert human.prompt == "def f():"
    assert human.tests == "\ndef check(c):\n    assert c() == 1\ncheck(f)"
    multiple = prompts.multipl_e({"prompt": "function f() {\n", "tests": "t", "stop_tokens": ["\nfunction "]})
    assert multiple.stop_words == ("\nfunction ", "<file_sep>")
