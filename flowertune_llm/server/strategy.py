"""The server's aggregation strategy: a Flower strategy with the LoRA round hooks, built from the settings.

Aggregation itself is Flower's: FedAvg by default (weighted by each client's `num-examples`), or
any strategy of the registry (shared/registry.py STRATEGIES: FedProx, FedAdam, FedYogi, FedAdagrad,
FedAvgM) by `strategy.name`, optionally inside one of Flower's differential-privacy wrappers
(server/privacy.py). `build_strategy` is the one place that turns the settings into a strategy object.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import flwr.serverapp.strategy as flower_strategies

from flowertune_llm.server.privacy import build_private_strategy
from flowertune_llm.server.rounds import LoraRounds
from flowertune_llm.shared.registry import STRATEGIES
from flowertune_llm.shared.settings import AppConfig, StrategySettings


def flower_strategy(name: str) -> type[flower_strategies.FedAvg]:
    """Return Flower's strategy class for registry name `name`."""
    return getattr(flower_strategies, STRATEGIES[name].flower_class)


@cache
def lora_strategy(name: str) -> type[LoraRounds]:
    """Return Flower's strategy `name` with the LoRA round hooks listed first in its bases."""
    flower_class = flower_strategy(name)
    return type(f"Lora{flower_class.__name__}", (LoraRounds, flower_class),
                {"__doc__": f"Flower's {flower_class.__name__} with the LoRA round hooks."})


def strategy_arguments(settings: StrategySettings) -> dict[str, Any]:
    """Return the Flower constructor arguments of `strategy.name`: sampling plus its own parameters."""
    return dict(
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_train_nodes=settings.min_train_nodes,
        min_evaluate_nodes=settings.min_evaluate_nodes,
        min_available_nodes=settings.min_available_nodes,
        **{name: getattr(settings, name) for name in STRATEGIES[settings.name].parameters},
    )


def build_strategy(
    config: AppConfig, learning_rate: Callable[[int], float], round_offset: int = 0
) -> LoraRounds:
    """Return the configured Flower strategy (in its privacy wrapper, if any) with the LoRA round hooks."""
    hooks: dict[str, Any] = dict(
        learning_rate=learning_rate,
        transfer_dtype=config.transfer.dtype,
        min_train_replies=config.strategy.min_train_replies,
        round_offset=round_offset,
        evaluate_on_receipt=config.evaluate.on_receipt,
        last_round=config.num_server_rounds,
    )
    arguments = strategy_arguments(config.strategy)
    if config.privacy.enabled:
        inner = flower_strategy(config.strategy.name)(**arguments)
        return build_private_strategy(config, inner, **hooks)
    return lora_strategy(config.strategy.name)(**hooks, **arguments)
