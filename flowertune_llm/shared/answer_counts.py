"""Exact-match counts: what a client reports of its answers, and how the server adds them up.

Counts, not ratios, travel (shared/protocol.py names the metric entries), so the server's total is
the example-weighted accuracy of all clients together. Overall counts are in every evaluate reply;
per-task ones only for the tasks a client's held-out share holds, so they are summed, never averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import MetricRecord

from flowertune_llm.shared.protocol import EXACT_MATCH_CORRECT, EXACT_MATCH_TOTAL, PER_TASK_SEPARATOR


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


def to_metrics(counts: ExactMatchCounts) -> dict[str, int]:
    """Return the counts as MetricRecord entries (nothing when no example was asked)."""
    if counts.total == 0:
        return {}
    metrics = {EXACT_MATCH_CORRECT: counts.correct, EXACT_MATCH_TOTAL: counts.total}
    for task, (correct, total) in counts.per_task.items():
        metrics[f"{EXACT_MATCH_CORRECT}{PER_TASK_SEPARATOR}{task}"] = correct
        metrics[f"{EXACT_MATCH_TOTAL}{PER_TASK_SEPARATOR}{task}"] = total
    return metrics


def is_per_task_key(key: str) -> bool:
    """Return whether a metric name is a per-task exact-match count."""
    return key.startswith((EXACT_MATCH_CORRECT + PER_TASK_SEPARATOR, EXACT_MATCH_TOTAL + PER_TASK_SEPARATOR))


def from_metrics(metrics: Mapping[str, object]) -> ExactMatchCounts:
    """Return the counts a reply's metrics carry (empty counts when it carries none)."""
    per_task = {
        key.split(PER_TASK_SEPARATOR, 1)[1]: (
            int(metrics[key]), int(metrics[key.replace(EXACT_MATCH_CORRECT, EXACT_MATCH_TOTAL, 1)])
        )
        for key in metrics if key.startswith(EXACT_MATCH_CORRECT + PER_TASK_SEPARATOR)
    }
    return ExactMatchCounts(int(metrics.get(EXACT_MATCH_CORRECT, 0)), int(metrics.get(EXACT_MATCH_TOTAL, 0)), per_task)


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
