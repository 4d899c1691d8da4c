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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from flwr.app import MetricRecord
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from flowertune_llm.data import TASK_COLUMN

# Built-in tasks (flowertune_llm/builtin_data.py) whose expected answer differs from a wrong one by case.
CASE_SENSITIVE_TASKS = frozenset({"uppercase"})


def normalise_answer(text: str, case_sensitive: bool = False) -> str:
    """Return `text` stripped, with whitespace runs collapsed to one space, casefolded unless `case_sensitive`."""
    collapsed = " ".join(text.split())
    return collapsed if case_sensitive else collapsed.casefold()


def answers_match(prediction: str, reference: str, task: str = "") -> bool:
    """Return whether a prediction equals the reference answer after both are normalised for `task`."""
    case_sensitive = task in CASE_SENSITIVE_TASKS
    return normalise_answer(prediction, case_sensitive) == normalise_answer(reference, case_sensitive)


@dataclass(frozen=True)
class ExactMatchCounts:
    """Right answers out of examples asked, overall and per task (task -> (correct, total))."""

    correct: int = 0
    total: int = 0
    per_task: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """Return correct / total (0.0 when nothing was asked)."""
        return self.correct / self.total if self.total else 0.0

    def task_accuracy(self, task: str) -> float:
        """Return the accuracy on one task (0.0 when it had no examples)."""
        correct, total = self.per_task.get(task, (0, 0))
        return correct / total if total else 0.0


def combine_counts(counts: Iterable[ExactMatchCounts]) -> ExactMatchCounts:
    """Return the sum of several clients' counts (their accuracy is the example-weighted mean)."""
    correct = total = 0
    per_task: dict[str, tuple[int, int]] = {}
    for part in counts:
        correct, total = correct + part.correct, total + part.total
        for task, (task_correct, task_total) in part.per_task.items():
            so_far = per_task.get(task, (0, 0))
            per_task[task] = (so_far[0] + task_correct, so_far[1] + task_total)
    return ExactMatchCounts(correct, total, dict(sorted(per_task.items())))


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


# How counts travel in a client's evaluate reply. Overall counts are in every reply; per-task ones
# only for the tasks a client's held-out share holds, so they are summed, never averaged.
CORRECT_KEY = "exact-match-correct"
TOTAL_KEY = "exact-match-total"
_PER_TASK_SEPARATOR = "/"


def to_metrics(counts: ExactMatchCounts) -> dict[str, int]:
    """Return the counts as MetricRecord entries (nothing when no example was asked)."""
    if counts.total == 0:
        return {}
    metrics = {CORRECT_KEY: counts.correct, TOTAL_KEY: counts.total}
    for task, (correct, total) in counts.per_task.items():
        metrics[f"{CORRECT_KEY}{_PER_TASK_SEPARATOR}{task}"] = correct
        metrics[f"{TOTAL_KEY}{_PER_TASK_SEPARATOR}{task}"] = total
    return metrics


def is_per_task_key(key: str) -> bool:
    """Return whether a metric name is a per-task exact-match count."""
    return key.startswith((CORRECT_KEY + _PER_TASK_SEPARATOR, TOTAL_KEY + _PER_TASK_SEPARATOR))


def from_metrics(metrics: Mapping[str, object]) -> ExactMatchCounts:
    """Return the counts a reply's metrics carry (empty counts when it carries none)."""
    per_task = {
        key.split(_PER_TASK_SEPARATOR, 1)[1]: (int(metrics[key]), int(metrics[key.replace(CORRECT_KEY, TOTAL_KEY, 1)]))
        for key in metrics if key.startswith(CORRECT_KEY + _PER_TASK_SEPARATOR)
    }
    return ExactMatchCounts(int(metrics.get(CORRECT_KEY, 0)), int(metrics.get(TOTAL_KEY, 0)), per_task)


def without_per_task_keys(metrics: MetricRecord) -> MetricRecord:
    """Return the metrics without per-task counts (what Flower's weighted mean can average)."""
    return MetricRecord({key: value for key, value in metrics.items() if not is_per_task_key(key)})


def record_fields(counts: ExactMatchCounts, prefix: str) -> dict[str, object]:
    """Return a round record's exact-match fields: accuracy, examples asked and accuracy per task."""
    if counts.total == 0:
        return {}
    fields: dict[str, object] = {prefix: counts.accuracy, f"{prefix}_examples": counts.total}
    if counts.per_task:
        fields[f"{prefix}_per_task"] = {task: counts.task_accuracy(task) for task in counts.per_task}
    return fields
