"""Which client replies may enter aggregation: one check per reply, naming what is wrong.

Flower's strategies assume consistent replies: a single reply without `num-examples`, with other
keys, or with NaN weights either aborts the run or poisons the average. Each check here returns
the reason a reply must be rejected, or None when it is fine to aggregate.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from flowertune_llm.shared.adapters import WIRE_DTYPES
from flowertune_llm.shared.answer_counts import is_per_task_key
from flowertune_llm.shared.protocol import ARRAYS, EVAL_LOSS, METRICS, NUM_EXAMPLES, TRAIN_LOSS


def _check_metrics(reply: Message, loss_key: str) -> str | None:
    records = reply.content.metric_records
    if list(records) != [METRICS]:
        return f"expected one MetricRecord '{METRICS}', got {sorted(records) or 'none'}"
    metrics: MetricRecord = records[METRICS]
    examples = metrics.get(NUM_EXAMPLES)
    if not isinstance(examples, (int, float)) or not math.isfinite(examples) or examples <= 0:
        return f"'{NUM_EXAMPLES}' must be a positive number, got {examples!r}"
    loss = metrics.get(loss_key)
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return f"'{loss_key}' must be a finite number, got {loss!r}"
    return None


def check_train_reply(reply: Message, sent: ArrayRecord, transfer_dtype: str) -> str | None:
    """Return why a training reply cannot be aggregated with the adapter `sent`, or None."""
    problem = _check_metrics(reply, TRAIN_LOSS)
    if problem:
        return problem
    records = reply.content.array_records
    if list(records) != [ARRAYS]:
        return f"expected one ArrayRecord 'arrays', got {sorted(records) or 'none'}"
    arrays: ArrayRecord = records[ARRAYS]
    missing, extra = sent.keys() - arrays.keys(), arrays.keys() - sent.keys()
    if missing or extra:
        return (
            f"adapter keys differ from the global adapter: {len(missing)} missing "
            f"{sorted(missing)[:2]}, {len(extra)} extra {sorted(extra)[:2]}"
        )
    wire_dtype = WIRE_DTYPES[transfer_dtype]
    for name, array in arrays.items():
        if tuple(array.shape) != tuple(sent[name].shape):
            return f"'{name}' has shape {tuple(array.shape)}, expected {tuple(sent[name].shape)}"
        if array.dtype != wire_dtype:
            return f"'{name}' has dtype {array.dtype}, expected {wire_dtype} (transfer.dtype={transfer_dtype})"
        values = array.numpy()
        if values.dtype == np.uint16:  # bfloat16 bits: exponent all ones means Inf or NaN
            finite = bool(np.all((values & 0x7F80) != 0x7F80))
        else:
            finite = bool(np.isfinite(values).all())
        if not finite:
            return f"'{name}' holds NaN or Inf values"
    return None


def check_evaluate_reply(reply: Message) -> str | None:
    """Return why an evaluation reply cannot be averaged, or None."""
    return _check_metrics(reply, EVAL_LOSS)


def metric_keys(reply: Message) -> frozenset[str]:
    """Return the metric names of a reply that replies averaged together must share.

    Per-task exact-match counts are left out: a client's held-out share need not hold every task.
    """
    return frozenset(key for key in reply.content.metric_records[METRICS].keys() if not is_per_task_key(key))
