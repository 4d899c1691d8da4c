"""The LoRA round hooks: what a Flower strategy needs added to fine-tune adapters round after round.

`LoraRounds` is mixed into whichever Flower strategy aggregates (server/strategy.py builds the
combination; server/privacy.py puts Flower's DP wrappers under it). It adds a learning rate that
changes across rounds, adapters in a compact transfer precision, replies checked before they reach
the average, and a record of each round (clients sampled, replied, failed, rejected; bytes each way).
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from flowertune_llm.server.replies import check_evaluate_reply, check_train_reply, metric_keys
from flowertune_llm.shared.adapters import apply_update, from_array_record, to_array_record, to_float32
from flowertune_llm.shared.answer_counts import combine_counts, from_metrics, record_fields, without_per_task_keys
from flowertune_llm.shared.flower_compat import superlink_node_id
from flowertune_llm.shared.protocol import (
    ARRAYS,
    EVAL_LOSS,
    EVALUATE_RECEIVED,
    LEARNING_RATE,
    METRICS,
    NUM_EXAMPLES,
    RUN_ROUND,
    split_received_evaluation,
)


class LoraRounds:
    """LoRA round hooks, mixed into a Flower strategy (listed first in the bases).

    - the round's learning rate (and its number counting rounds before a resume) go into the
      train config;
    - the global adapter stays float32 here and travels in `transfer_dtype`; clients reply with
      their update in that precision, which is added to the float32 adapter they were sent, so
      the strategy aggregates whole float32 adapters and 16-bit rounding never touches a weight;
    - replies are checked before aggregation: a malformed one is logged and left out, and with
      fewer than `min_train_replies` valid ones the round keeps the previous global adapter;
    - `round_stats[round]` keeps what happened: sampled, replied, failed, rejected, bytes, losses;
    - with `evaluate_on_receipt`, no evaluate messages until the last round: each train message asks
      its node to evaluate the adapter it brings (the global adapter after the previous round), and
      those figures go into the previous round's `round_stats`; the last round's adapter is
      evaluated by evaluate messages as usual, after its training.

    Flower's server optimisers (FedAdam, FedYogi, FedAdagrad, FedAvgM) keep the global arrays they
    were given in `configure_train` and step from them: those are the float32 arrays of the run,
    because encoding for the wire happens here, after the strategy built its messages, and each
    reply is turned back into a float32 adapter before the strategy sees it.
    """

    def __init__(
        self,
        *,
        learning_rate: Callable[[int], float],
        transfer_dtype: str = "float32",
        min_train_replies: int = 1,
        round_offset: int = 0,
        uniform_weights: bool = False,
        evaluate_on_receipt: bool = False,
        last_round: int = 0,
        **strategy_args: Any,
    ) -> None:
        super().__init__(**strategy_args)
        self.learning_rate = learning_rate
        # Count every client once instead of by examples (differential privacy calibrates its
        # noise to a plain mean of clipped updates).
        self.uniform_weights = uniform_weights
        self.transfer_dtype = transfer_dtype
        self.min_train_replies = min_train_replies
        self.round_offset = round_offset
        self.round_stats: dict[int, dict[str, Any]] = defaultdict(dict)
        self._sent: ArrayRecord = ArrayRecord()
        self.evaluate_on_receipt = evaluate_on_receipt
        self.last_round = last_round  # the run's last round (num-server-rounds)
        # The round whose global adapter the next train messages bring, if nobody evaluated it yet:
        # none before round 1 (the initial adapter is not recorded); a resumed run may set it.
        self.unevaluated_round: int | None = None
        self._evaluating: int | None = None

    def run_round(self, server_round: int) -> int:
        """Return the round's number in the whole run (Flower counts from 1 again after a resume)."""
        return server_round + self.round_offset

    def _send(self, messages: list[Message], arrays: ArrayRecord) -> int:
        """Put the adapter into the messages in transfer precision; return the bytes sent."""
        encoded = to_array_record(from_array_record(arrays), self.transfer_dtype)
        for message in messages:
            message.content[ARRAYS] = encoded
        return encoded.count_bytes() * len(messages)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Add the round's learning rate, sample as the strategy does, send in transfer precision."""
        run_round = self.run_round(server_round)
        config[LEARNING_RATE] = self.learning_rate(run_round)
        config[RUN_ROUND] = run_round
        if self.evaluate_on_receipt:
            self._evaluating = self.unevaluated_round
            config[EVALUATE_RECEIVED] = self._evaluating is not None
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent = arrays
        stats = self.round_stats[run_round]
        stats.update(learning_rate=config[LEARNING_RATE], train_sampled=len(messages))
        if self._evaluating is not None:
            self.round_stats[self._evaluating]["eval_sampled"] = len(messages)
        stats["bytes_down"] = stats.get("bytes_down", 0) + self._send(messages, arrays)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies, then aggregate the float32 adapters their updates give."""
        run_round = self.run_round(server_round)
        replies = list(replies)
        received_evaluations = self._split_received_evaluations(replies)
        if self._evaluating is not None:
            self._aggregate_evaluation(server_round, self._evaluating, received_evaluations, report_lost=False)
        if self.evaluate_on_receipt:
            self.unevaluated_round, self._evaluating = run_round, None
        stats = self.round_stats[run_round]
        failures = [reply for reply in replies if reply.has_error()]
        self._log_lost_replies(run_round, "train", stats.get("train_sampled", 0), replies)
        valid = self._valid_replies(
            run_round, "train", [r for r in replies if not r.has_error()],
            lambda reply: check_train_reply(reply, self._sent, self.transfer_dtype),
        )
        stats.update(
            train_replies=len(replies) - len(failures),
            train_failures=len(failures),
            train_rejected=len(replies) - len(failures) - len(valid),
            train_examples=sum(int(reply.content[METRICS][NUM_EXAMPLES]) for reply in valid),
            bytes_up=sum(r.content[ARRAYS].count_bytes() for r in replies if not r.has_error()
                         and isinstance(r.content.get(ARRAYS), ArrayRecord)),
        )
        if valid:
            # A round waits for its slowest client; the mean in the aggregated metrics hides it.
            stats["time_train_slowest_s"] = max(float(r.content[METRICS].get("time-train-s", 0.0)) for r in valid)
        if len(valid) < self.min_train_replies:
            stats["kept_previous_adapter"] = True
            log(WARNING, "Round %d: %d valid replies, fewer than strategy.min-train-replies=%d: "
                "keeping the previous global adapter", run_round, len(valid), self.min_train_replies)
            return None, None
        started = time.perf_counter()
        for reply in valid:
            reply.content[ARRAYS] = apply_update(self._sent, reply.content[ARRAYS])
            if self.uniform_weights:
                reply.content[METRICS][NUM_EXAMPLES] = 1
        arrays, metrics = super().aggregate_train(server_round, valid + failures)
        if arrays is not None:
            # FedAdam's numpy scalars make float64 arrays; the global adapter stays float32.
            arrays = to_float32(arrays)
        else:  # e.g. a DP wrapper skips a round in which a client failed
            stats["kept_previous_adapter"] = True
        stats["time_aggregate_s"] = round(time.perf_counter() - started, 4)
        if metrics is not None:
            # train_loss, and the clients' timings and memory (means weighted by examples).
            stats.update({key.replace("-", "_"): float(value) for key, value in metrics.items()
                          if key != NUM_EXAMPLES})
        return arrays, metrics

    def _split_received_evaluations(self, replies: list[Message]) -> list[Message]:
        """Take the received adapter's evaluation out of each train reply; return them as evaluate replies.

        A train reply keeps its own metrics only (what Flower's aggregation expects); its evaluation
        becomes a reply of its own, from the same node, for the evaluation checks and average. A
        reply that failed stays a failure for both.
        """
        evaluations = []
        for reply in replies:
            if reply.has_error():
                evaluations.append(reply)
                continue
            metrics = reply.content.metric_records.get(METRICS)
            own, evaluation = split_received_evaluation(metrics) if metrics is not None else ({}, {})
            if evaluation:
                reply.content[METRICS] = MetricRecord(own)
            evaluated = copy.copy(reply)  # the same node and message ids, another content
            evaluated.content = RecordDict({METRICS: MetricRecord(evaluation)} if evaluation else {})
            evaluations.append(evaluated)
        return evaluations

    def evaluated_on_receipt(self, run_round: int) -> bool:
        """Return whether round `run_round`'s adapter is left to the next round's train messages."""
        return self.evaluate_on_receipt and run_round < self.last_round

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients for evaluation as the strategy does, sending in transfer precision."""
        if self.evaluated_on_receipt(self.run_round(server_round)):
            return []
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        stats = self.round_stats[self.run_round(server_round)]
        stats["eval_sampled"] = len(messages)
        stats["bytes_down"] = stats.get("bytes_down", 0) + self._send(messages, arrays)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average the valid replies' held-out losses by example count; sum their exact-match counts."""
        run_round = self.run_round(server_round)
        if self.evaluated_on_receipt(run_round):
            return None
        return self._aggregate_evaluation(server_round, run_round, list(replies))

    def _aggregate_evaluation(
        self, server_round: int, run_round: int, replies: list[Message], report_lost: bool = True
    ) -> MetricRecord | None:
        """Record the evaluation of round `run_round`'s global adapter from its replies (see aggregate_evaluate)."""
        failures = [reply for reply in replies if reply.has_error()]
        if report_lost:
            self._log_lost_replies(run_round, "evaluate", self.round_stats[run_round].get("eval_sampled", 0), replies)
        valid = self._valid_replies(
            run_round, "evaluate", [r for r in replies if not r.has_error()], check_evaluate_reply
        )
        stats = self.round_stats[run_round]
        stats.update(
            eval_replies=len(replies) - len(failures),
            eval_failures=len(failures),
            eval_rejected=len(replies) - len(failures) - len(valid),
        )
        if not valid:
            return None
        # Right answers over questions asked, all clients together: the example-weighted mean.
        counts = combine_counts(from_metrics(reply.content[METRICS]) for reply in valid)
        stats.update(record_fields(counts, "eval_exact_match"))
        for reply in valid:
            reply.content[METRICS] = without_per_task_keys(reply.content[METRICS])
        metrics = super().aggregate_evaluate(server_round, valid + failures)
        if metrics is not None and EVAL_LOSS in metrics:
            stats[EVAL_LOSS] = float(metrics[EVAL_LOSS])
            # The clients' evaluation phases (means weighted by examples): held-out loss, exact match.
            for phase in ("eval-loss", "exact-match"):
                if f"time-{phase}-s" in metrics:
                    stats[f"eval_time_{phase.replace('-', '_')}_s"] = round(float(metrics[f"time-{phase}-s"]), 4)
        return metrics

    def _log_lost_replies(self, run_round: int, kind: str, sampled: int, replies: list[Message]) -> None:
        """Say which sampled nodes did not deliver: an error reply (with Flower's reason) or none at all."""
        for reply in replies:
            if reply.has_error():
                # The SuperLink answers for a node that stopped sending heartbeats (it left or died).
                source = reply.metadata.src_node_id
                who = "the SuperLink" if source == superlink_node_id() else f"node {source}"
                log(WARNING, "Round %d: %s failed, reported by %s: %s", run_round, kind, who, reply.error.reason)
        if sampled > len(replies):
            log(WARNING, "Round %d: %d of %d sampled nodes sent no %s reply within strategy.round-timeout "
                "(node stopped, disconnected or too slow); the round goes on without them",
                run_round, sampled - len(replies), sampled, kind)

    def _valid_replies(
        self, run_round: int, kind: str, replies: list[Message], check: Callable[[Message], str | None]
    ) -> list[Message]:
        """Return the replies that pass `check` and share their metric names; log the others."""
        valid: list[Message] = []
        for reply in replies:
            reason = check(reply)
            if reason is None and valid and metric_keys(reply) != metric_keys(valid[0]):
                reason = f"its metrics {sorted(metric_keys(reply))} differ from other replies' {sorted(metric_keys(valid[0]))}"
            if reason is None:
                valid.append(reply)
            else:
                log(WARNING, "Round %d: rejected %s reply from node %d: %s",
                    run_round, kind, reply.metadata.src_node_id, reason)
        return valid
