"""The server's aggregation strategy: a Flower strategy plus the hooks a LoRA fine-tune needs.

Aggregation itself is Flower's (FedAvg by default, weighted by each client's `num-examples`).
`LoraRounds` adds, to whichever Flower strategy it is mixed into, what those strategies do not do:
a learning rate that changes across rounds, and a record of how many clients were sampled,
replied and failed in each round. `build_strategy` is the one place that turns the `strategy.*`
settings into a strategy object.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from flowertune_llm.config import StrategySettings

LEARNING_RATE_KEY = "learning-rate"


class LoraRounds:
    """Per-round learning rate and reply counts, mixed into a Flower strategy (listed first)."""

    def __init__(self, *, learning_rate: Callable[[int], float], **strategy_args: Any) -> None:
        super().__init__(**strategy_args)
        self.learning_rate = learning_rate
        self.round_stats: dict[int, dict[str, Any]] = defaultdict(dict)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Add this round's learning rate to the train config, then sample as the strategy does."""
        config[LEARNING_RATE_KEY] = self.learning_rate(server_round)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.round_stats[server_round].update(
            learning_rate=config[LEARNING_RATE_KEY], train_sampled=len(messages)
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the adapters and note the round's reply counts and loss."""
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
        """Sample clients for evaluation as the strategy does, noting how many."""
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


class LoraFedAvg(LoraRounds, FedAvg):
    """Flower's FedAvg with the LoRA round hooks."""


def build_strategy(settings: StrategySettings, learning_rate: Callable[[int], float]) -> Strategy:
    """Return the configured Flower strategy with the LoRA round hooks mixed in."""
    return LoraFedAvg(
        learning_rate=learning_rate,
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_train_nodes,
        min_evaluate_nodes=settings.min_evaluate_nodes,
        min_available_nodes=settings.min_available_nodes,
    )
