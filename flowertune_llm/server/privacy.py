"""Central differential privacy by configuration: Flower's clipping wrappers, mods and accountant.

`privacy.differential-privacy` picks one of Flower's four central-DP wrappers:
  server-fixed     the server clips each client's update to `privacy.clipping-norm`, then noises the mean
  client-fixed     clients clip their own update (Flower's `fixedclipping_mod`), the server noises the mean
  server-adaptive  as server-fixed, with a bound that follows a quantile of the update norms
  client-adaptive  as client-fixed, with that adaptive bound (`adaptiveclipping_mod`)
The wrapper holds a plain Flower FedAvg or FedProx; the LoRA round hooks sit outside it, so the
wrapper clips and noises float32 values, never the bit patterns adapters travel in. Each client
counts once in the mean (the noise, `noise-multiplier * clipping-norm / sampled clients`, is
calibrated to a plain mean), and `strategy.min-train-nodes` is the number of clients sampled.

With fixed clipping, a positive noise multiplier and Flower's accountant installed
(`pip install "flwr[dp]"`), the epsilon spent so far (at `privacy.target-delta`) goes into each
round's record, with no amplification by sampling assumed (every round releases a Gaussian mean).

Flower 1.42's adaptive wrappers move the bound the wrong way and noise with the moved bound; the
adaptive classes here correct both (`AdaptivePrivateRounds`). Clients clip in client/clipping.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import cache
from logging import WARNING
from typing import Any

import flwr.serverapp.strategy as flower_strategies
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp.strategy import Strategy

from flowertune_llm.server.rounds import LoraRounds
from flowertune_llm.shared.flower_compat import gaussian_noise_stddev
from flowertune_llm.shared.registry import DP_MODES
from flowertune_llm.shared.settings import AppConfig


class PrivateRounds(LoraRounds):
    """LoRA round hooks over a Flower DP wrapper: each client counts once; noise and epsilon recorded."""

    def __init__(self, **arguments: Any) -> None:
        super().__init__(uniform_weights=True, **arguments)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate through the DP wrapper; record the clipping bound, noise and privacy spent."""
        clipping_norm = self.clipping_norm  # adaptive wrappers move it during aggregation
        arrays, metrics = super().aggregate_train(server_round, replies)
        stats = self.round_stats[self.run_round(server_round)]
        stats["dp_clipping_norm"] = float(clipping_norm)
        if arrays is not None:
            # The noise the wrapper added to the mean (adaptive: with this round's bound, see below).
            stats["dp_noise_stddev"] = gaussian_noise_stddev(self.noise_multiplier, self.clipping_norm,
                                                             self.num_sampled_clients)
        spent = self.privacy_spent() if hasattr(self, "privacy_spent") else None
        if spent is not None:
            stats.update(privacy_epsilon=float(spent.epsilon), privacy_delta=float(spent.delta))
        return arrays, metrics


class AdaptivePrivateRounds(PrivateRounds):
    """Private rounds with an adaptive bound, as in Andrew et al. 2021 (arxiv.org/abs/1905.03871).

    Two corrections to Flower 1.42's adaptive wrappers, which count *clipped* updates but use the
    paper's update for the fraction of *unclipped* ones:
    - direction: the bound must grow when more than `target_clipped_quantile` of the updates were
      clipped, C <- C·exp(lr·(clipped fraction − target)); Flower's sign shrinks it instead, so a
      bound below most update norms collapses towards zero, and one above them grows without limit;
    - order: the round's noise must be calibrated to the bound the updates were clipped with;
      Flower moves the bound first and then noises with the new one (too little noise when it shrinks).
    The new bound takes effect after this round's noise, for the next round.
    """

    _next_clipping_norm: float | None = None

    # Flower's hook (flower_compat.ADAPTIVE_CLIPPING_HOOK), called with the fraction of clipped updates.
    def _geometric_update(self, clipped_fraction: float) -> None:
        self._next_clipping_norm = self.clipping_norm * math.exp(
            self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile)
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate and noise with this round's bound; then move the bound for the next round."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self._next_clipping_norm is not None:
            self.clipping_norm, self._next_clipping_norm = self._next_clipping_norm, None
        return arrays, metrics


@cache
def private_strategy(mode: str) -> type[PrivateRounds]:
    """Return Flower's DP wrapper for `privacy.differential-privacy=mode` with the LoRA round hooks."""
    entry = DP_MODES[mode]
    wrapper = getattr(flower_strategies, entry.flower_class)
    rounds = AdaptivePrivateRounds if entry.adaptive else PrivateRounds
    return type(f"Lora{wrapper.__name__}", (rounds, wrapper),
                {"__doc__": f"Flower's {wrapper.__name__} ({entry.summary}) with the LoRA round hooks."})


def privacy_accountant(config: AppConfig) -> Any | None:
    """Return Flower's RDP accountant for this run, or None (with the reason logged) where it cannot be used."""
    privacy = config.privacy
    reason = None
    if privacy.adaptive:
        reason = "Flower's accountant covers fixed clipping only"
    elif privacy.noise_multiplier == 0:
        reason = "privacy.noise-multiplier is 0: no noise, no differential privacy"
    if reason is None:
        sampled = config.strategy.min_train_nodes
        try:
            from flwr.serverapp import RdpAccountant

            return RdpAccountant(PrivacyConfig(
                target_delta=privacy.target_delta,
                population_size=max(sampled, config.strategy.min_available_nodes),
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            ))
        except ImportError:
            reason = 'Flower\'s accountant needs its dp extra: pip install "flwr[dp]"'
    log(WARNING, "Privacy spent is not reported: %s", reason)
    return None


def build_private_strategy(config: AppConfig, inner: Strategy, **hooks: Any) -> PrivateRounds:
    """Return `inner` in the DP wrapper `privacy.differential-privacy` names, with the LoRA round hooks."""
    privacy = config.privacy
    sampled = config.strategy.min_train_nodes
    wrapper = private_strategy(privacy.differential_privacy)
    accountant = privacy_accountant(config)  # None for adaptive clipping, with the reason logged
    if privacy.adaptive:
        return wrapper(
            strategy=inner, noise_multiplier=privacy.noise_multiplier, num_sampled_clients=sampled,
            initial_clipping_norm=privacy.clipping_norm,
            target_clipped_quantile=privacy.target_clipped_quantile, clip_norm_lr=privacy.clip_norm_lr,
            **hooks,
        )
    return wrapper(
        strategy=inner, noise_multiplier=privacy.noise_multiplier, clipping_norm=privacy.clipping_norm,
        num_sampled_clients=sampled, accountant=accountant, **hooks,
    )
