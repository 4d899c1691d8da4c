"""FedAvg over LoRA state dicts, sending each round's learning rate and keeping per-round stats.

Aggregation itself is Flower's FedAvg, weighted by each client's `num-examples`; this subclass only
adds the two things FedAvg does not do: a learning rate that changes across rounds, and a record
of how many clients were sampled, replied and failed in each round.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

LEARNING_RATE_KEY = "learning-rate"


class LoraFedAvg(FedAvg):
    """Flower's FedAvg with a per-round learning rate in the train config."""

    def __init__(self, learning_rate: Callable[[int], float], **fedavg_args: Any) -> None:
        super().__init__(**fedavg_args)
        self.learning_rate = learning_rate
        self.round_stats: dict[int, dict[str, Any]] = defaultdict(dict)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Add this round's learning rate to the train config, then sample as FedAvg does."""
        config[LEARNING_RATE_KEY] = self.learning_rate(server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.round_stats[server_round].update(
            learning_rate=config[LEARNING_RATE_KEY], train_sampled=len(messages)
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the adapters (FedAvg) and note the round's reply counts and loss."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        failures = sum(reply.has_error() for reply in replies)
        stats = self.round_stats[server_round]
        stats.update(train_replies=len(replies) - failures, train_failures=failures)
        if metrics is not None and "train_loss" in metrics:
            stats["train_loss"] = float(metrics["train_loss"])
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients for evaluation as FedAvg does, noting how many."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.round_stats[server_round]["eval_sampled"] = len(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average the clients' held-out losses by example count, noting the round's reply counts."""
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        failures = sum(reply.has_error() for reply in replies)
        stats = self.round_stats[server_round]
        stats.update(eval_replies=len(replies) - failures, eval_failures=failures)
        if metrics is not None and "eval_loss" in metrics:
            stats["eval_loss"] = float(metrics["eval_loss"])
        return metrics
