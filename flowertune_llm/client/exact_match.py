"""Exact-match accuracy of an adapter: greedy answers to held-out prompts, compared after normalising.

A loss says little to a user; "37 of 180 answers right" says more. The model answers each `prompt`
greedily (batched, left-padded, until EOS or `max_new_tokens`), and the answer counts as right when
it equals the `completion` after both go through `normalise_answer`: surrounding whitespace is
stripped, inner runs of whitespace become one space, and case is ignored, except for the tasks in
CASE_SENSITIVE_TASKS, whose answer *is* a matter of case. User data follows the same rule: its
answers are compared case-insensitively unless its task column names one of those tasks.
Counts, not ratios, come back, so that clients can report them and the server can weight by examples.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from flowertune_llm.client.data import TASK_COLUMN
from flowertune_llm.shared.answer_counts import ExactMatchCounts

# Built-in tasks (flowertune_llm/builtin/world.py) whose expected answer differs from a wrong one by case.
CASE_SENSITIVE_TASKS = frozenset({"uppercase"})


def normalise_answer(text: str, case_sensitive: bool = False) -> str:
    """Return `text` stripped, with whitespace runs collapsed to one space, casefolded unless `case_sensitive`."""
    collapsed = " ".join(text.split())
    return collapsed if case_sensitive else collapsed.casefold()


def answers_match(prediction: str, reference: str, task: str = "") -> bool:
    """Return whether a prediction equals the reference answer after both are normalised for `task`."""
    case_sensitive = task in CASE_SENSITIVE_TASKS
    return normalise_answer(prediction, case_sensitive) == normalise_answer(reference, case_sensitive)


def _task_name(value: object) -> str:
    """Return a task cell as text (a missing one is the unnamed task)."""
    return "" if value is None else str(value)


def generate_answers(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Return the model's greedy continuation of each prompt, without the prompt and special tokens."""
    answers: list[str] = []
    was_training = model.training
    # Dropout off; the KV cache back on (training builds turn it off) for fast generation.
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            # Left padding: every prompt then ends where generation starts.
            inputs = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                               padding_side="left").to(model.device)
            with torch.no_grad():
                output = model.generate(
                    **inputs, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                )
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers


def exact_match(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: Dataset,
    max_examples: int,
    max_new_tokens: int,
    batch_size: int = 16,
) -> ExactMatchCounts:
    """Return exact-match counts of the model's greedy answers on the first `max_examples` examples of `data`.

    `data` has `prompt` and `completion` columns; with a `category` column, counts are also per task.
    """
    data = data.select(range(min(max_examples, len(data))))
    if len(data) == 0:
        return ExactMatchCounts()
    tasks = [_task_name(task) for task in data[TASK_COLUMN]] if TASK_COLUMN in data.column_names else [""] * len(data)
    answers = generate_answers(model, tokenizer, data["prompt"], max_new_tokens, batch_size)
    per_task: dict[str, tuple[int, int]] = {}
    for answer, reference, task in zip(answers, data["completion"], tasks, strict=True):
        right = int(answers_match(answer, reference, task))
        so_far = per_task.get(task, (0, 0))
        per_task[task] = (so_far[0] + right, so_far[1] + 1)
    correct = sum(right for right, _ in per_task.values())
    # Data without a task column has no per-task split to report.
    reported = {} if TASK_COLUMN not in data.column_names else dict(sorted(per_task.items()))
    return ExactMatchCounts(correct, len(data), reported)
