"""The wire protocol: every name a message between server and clients carries, in one place.

Server -> client (train and evaluate):  ARRAYS (the global adapter, in `transfer.dtype`) and
CONFIG (LEARNING_RATE and RUN_ROUND for training; PROXIMAL_MU when the strategy is FedProx;
EVALUATE_RECEIVED with `evaluate.on-receipt`).
Client -> server, train:     ARRAYS (the update, trained minus received) and METRICS
(TRAIN_LOSS, NUM_EXAMPLES, timings and memory; with EVALUATE_RECEIVED also the evaluate reply's
metrics of the adapter received, each name prefixed with RECEIVED_EVALUATION).
Client -> server, evaluate:  METRICS (EVAL_LOSS, NUM_EXAMPLES, the exact-match counts below).
Both apps and the strategy import these names; nothing else spells them.
"""

from __future__ import annotations

from collections.abc import Mapping

# Record names in a message's RecordDict.
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"

# Train config entries the strategy adds each round.
LEARNING_RATE = "learning-rate"
RUN_ROUND = "run-round"  # the round's number in the whole run (Flower counts from 1 after a resume)
# Flower's FedProx puts its mu here in the train config.
PROXIMAL_MU = "proximal-mu"
# With `evaluate.on-receipt`: true when the node is to evaluate the adapter it received (the global
# adapter after the previous round) on its held-out share before it trains.
EVALUATE_RECEIVED = "evaluate-received"

# Metric entries of a reply. Flower's strategies weight means by NUM_EXAMPLES.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train_loss"
EVAL_LOSS = "eval_loss"
# Exact-match counts: overall in every evaluate reply; per task as "<key>/<task>" for the tasks a
# node's held-out share holds, so the server sums them (shared/answer_counts.py).
EXACT_MATCH_CORRECT = "exact-match-correct"
EXACT_MATCH_TOTAL = "exact-match-total"
PER_TASK_SEPARATOR = "/"

# The evaluation of the received adapter rides in the train reply's one MetricRecord, each of its
# names behind this prefix: Flower's clipping mods and strategies expect exactly one MetricRecord.
RECEIVED_EVALUATION = "received-adapter:"


def with_received_evaluation(train_metrics: Mapping, evaluation: Mapping) -> dict:
    """Return a train reply's metrics with the received adapter's evaluation added under RECEIVED_EVALUATION."""
    return {**train_metrics, **{RECEIVED_EVALUATION + key: value for key, value in evaluation.items()}}


def split_received_evaluation(metrics: Mapping) -> tuple[dict, dict]:
    """Return a train reply's metrics as (training's own, the received adapter's evaluation)."""
    own = {key: value for key, value in metrics.items() if not key.startswith(RECEIVED_EVALUATION)}
    evaluation = {key.removeprefix(RECEIVED_EVALUATION): value for key, value in metrics.items()
                  if key.startswith(RECEIVED_EVALUATION)}
    return own, evaluation
