"""The server's strategy hooks: FedAvg weighting, transfer precision, bytes, and rejected replies."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from flowertune_llm.server.strategy import lora_strategy
from flowertune_llm.shared.adapters import from_array_record, to_array_record
from flowertune_llm.shared.protocol import LEARNING_RATE, RUN_ROUND

from conftest import Grid, train_reply, update_for

LoraFedAvg = lora_strategy("fedavg")
GLOBAL = OrderedDict({"x.lora_A.weight": torch.tensor([[0.5, 0.5]]), "x.lora_B.weight": torch.tensor([[0.0]])})
A = OrderedDict({"x.lora_A.weight": torch.tensor([[1.0, 2.0]]), "x.lora_B.weight": torch.tensor([[4.0]])})
B = OrderedDict({"x.lora_A.weight": torch.tensor([[3.0, -2.0]]), "x.lora_B.weight": torch.tensor([[0.0]])})


def _strategy(nodes: int = 2, **hooks) -> tuple[LoraFedAvg, list[Message]]:
    """A strategy that has sent GLOBAL to `nodes` nodes in round 1, and the messages it sent."""
    strategy = LoraFedAvg(learning_rate=lambda r: 0.1, min_train_nodes=nodes, min_available_nodes=nodes, **hooks)
    sent = list(strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), Grid(nodes)))
    return strategy, sent


@pytest.fixture(autouse=True)
def _as_server_app(server_app_identity):
    """Every test here builds Messages outside a run."""


def test_fedavg_of_adapters_is_the_example_weighted_mean():
    strategy, sent = _strategy()
    arrays, metrics = strategy.aggregate_train(1, [train_reply(sent[0], A, 2.0, 30), train_reply(sent[1], B, 1.0, 10)])
    averaged = arrays.to_torch_state_dict()
    for name in A:
        assert torch.allclose(averaged[name], (30 * A[name] + 10 * B[name]) / 40)
    assert metrics["train_loss"] == pytest.approx((30 * 2.0 + 10 * 1.0) / 40)
    assert strategy.round_stats[1]["train_replies"] == 2
    assert strategy.round_stats[1]["train_loss"] == pytest.approx(1.75)


def test_train_config_carries_the_run_round_and_its_learning_rate():
    # After a resume at round 3, Flower's round 1 is the run's round 4.
    strategy = LoraFedAvg(learning_rate=lambda r: 1.0 / r, round_offset=3)
    messages = list(strategy.configure_train(1, to_array_record(GLOBAL), ConfigRecord(), Grid(2)))
    assert len(messages) == 2
    sent = messages[0].content["config"]
    assert sent[LEARNING_RATE] == pytest.approx(0.25) and sent[RUN_ROUND] == 4
    assert math.isclose(strategy.round_stats[4]["learning_rate"], 0.25)


def test_bfloat16_transfer_halves_bytes_and_averages_real_values():
    plain, plain_sent = _strategy()
    compact, compact_sent = _strategy(transfer_dtype="bfloat16")
    assert {a.dtype for a in compact_sent[0].content["arrays"].values()} == {"uint16"}
    assert from_array_record(compact_sent[0].content["arrays"])["x.lora_A.weight"].dtype == torch.bfloat16

    plain.aggregate_train(1, [train_reply(plain_sent[0], A, examples=30), train_reply(plain_sent[1], B, examples=10)])
    arrays, _ = compact.aggregate_train(1, [
        train_reply(compact_sent[0], A, examples=30, dtype="bfloat16"),
        train_reply(compact_sent[1], B, examples=10, dtype="bfloat16"),
    ])
    averaged = arrays.to_torch_state_dict()
    assert averaged["x.lora_A.weight"].dtype == torch.float32
    assert torch.equal(averaged["x.lora_A.weight"], torch.tensor([[1.5, 1.0]]))
    # Payloads shrink to half; per array, numpy's header and the key's name are the same in both.
    header = sum(128 + len(name) for name in GLOBAL) * 2
    for direction in ("bytes_down", "bytes_up"):
        assert compact.round_stats[1][direction] - header < plain.round_stats[1][direction] - header
        assert (plain.round_stats[1][direction] - header) == 2 * (compact.round_stats[1][direction] - header)


def test_a_bfloat16_wire_keeps_steps_far_below_the_weights_precision():
    # Steps of 1e-4 and 3e-5 on a weight of 0.5 are below half a bf16 unit there (2^-9 = 2e-3):
    # sending the weight in bf16 would lose them; sending the update keeps them to bf16's relative error.
    strategy, sent = _strategy(transfer_dtype="bfloat16")
    step = {"x.lora_A.weight": torch.tensor([[1e-4, -3e-5]]), "x.lora_B.weight": torch.tensor([[2e-7]])}
    trained = {name: GLOBAL[name] + step[name] for name in GLOBAL}
    arrays, _ = strategy.aggregate_train(1, [train_reply(m, trained, dtype="bfloat16") for m in sent])
    moved = {name: t - GLOBAL[name] for name, t in arrays.to_torch_state_dict().items()}
    for name in GLOBAL:
        assert torch.allclose(moved[name], step[name], rtol=2**-8, atol=0)


def _nan(state: dict) -> dict:
    return {name: torch.full_like(t, float("nan")) for name, t in state.items()}


def _wire(dtype: str) -> ArrayRecord:
    return ArrayRecord(OrderedDict((n, Array(t.numpy().astype(dtype))) for n, t in A.items()))


BAD_REPLIES = {
    "NaN values": (lambda m: train_reply(m, _nan(A)), "holds NaN or Inf"),
    "Inf values": (lambda m: train_reply(m, {**A, "x.lora_B.weight": torch.tensor([[math.inf]])}), "holds NaN or Inf"),
    "NaN in bfloat16 bits": (lambda m: train_reply(m, _nan(A), dtype="bfloat16"), "dtype uint16, expected float32"),
    "wrong shape": (lambda m: train_reply(m, {**A, "x.lora_A.weight": torch.ones(2, 2)}), "shape (2, 2), expected (1, 2)"),
    "extra key": (lambda m: train_reply(m, {**A, "x.lora_C.weight": torch.ones(1)}), "1 extra ['x.lora_C.weight']"),
    "missing key": (lambda m: train_reply(m, {"x.lora_A.weight": A["x.lora_A.weight"]}), "1 missing ['x.lora_B.weight']"),
    "wrong dtype": (lambda m: train_reply(m, _wire("float64")), "dtype float64, expected float32"),
    "zero examples": (lambda m: train_reply(m, A, examples=0), "'num-examples' must be a positive number, got 0"),
    "negative examples": (lambda m: train_reply(m, A, examples=-5), "got -5"),
    "NaN loss": (lambda m: train_reply(m, A, loss=float("nan")), "'train_loss' must be a finite number"),
    "no num-examples": (
        lambda m: Message(RecordDict({"arrays": to_array_record(update_for(m, A)), "metrics": MetricRecord({"train_loss": 1.0})}),
                          reply_to=m),
        "'num-examples' must be a positive number, got None"),
    "no arrays": (
        lambda m: Message(RecordDict({"metrics": MetricRecord({"train_loss": 1.0, "num-examples": 3})}), reply_to=m),
        "expected one ArrayRecord 'arrays', got none"),
    "other metric names": (lambda m: train_reply(m, A, surprise=1.0), "differ from other replies'"),
}


@pytest.mark.parametrize("fault", BAD_REPLIES, ids=list(BAD_REPLIES))
def test_a_malformed_reply_is_rejected_and_the_others_are_averaged(fault, caplog):
    make_bad, reason = BAD_REPLIES[fault]
    strategy, sent = _strategy(nodes=3)
    good = [train_reply(sent[0], A, examples=30), train_reply(sent[1], B, examples=10)]
    arrays, _ = strategy.aggregate_train(1, [*good, make_bad(sent[2])])
    averaged = arrays.to_torch_state_dict()
    for name in A:
        assert torch.allclose(averaged[name], (30 * A[name] + 10 * B[name]) / 40)
    stats = strategy.round_stats[1]
    assert (stats["train_replies"], stats["train_rejected"], stats["train_failures"]) == (3, 1, 0)
    rejection = [r.getMessage() for r in caplog.records if "rejected train reply" in r.getMessage()]
    assert len(rejection) == 1 and f"from node {sent[2].metadata.dst_node_id}" in rejection[0]
    assert reason in rejection[0]


def test_bfloat16_nan_bits_are_caught():
    strategy, sent = _strategy(nodes=2, transfer_dtype="bfloat16")
    bad = train_reply(sent[1], _nan(A), dtype="bfloat16")
    arrays, _ = strategy.aggregate_train(1, [train_reply(sent[0], A, dtype="bfloat16"), bad])
    assert strategy.round_stats[1]["train_rejected"] == 1
    assert torch.equal(arrays.to_torch_state_dict()["x.lora_A.weight"], A["x.lora_A.weight"])


def test_too_few_valid_replies_keep_the_previous_adapter(caplog):
    strategy, sent = _strategy(nodes=2, min_train_replies=2)
    arrays, metrics = strategy.aggregate_train(1, [train_reply(sent[0], A), train_reply(sent[1], _nan(A))])
    assert arrays is None and metrics is None
    assert strategy.round_stats[1]["kept_previous_adapter"] is True
    assert any("keeping the previous global adapter" in r.getMessage() for r in caplog.records)


def test_all_replies_failing_keeps_the_previous_adapter():
    strategy, sent = _strategy(nodes=2)
    failed = [Message(Error(code=0, reason="client raised"), reply_to=message) for message in sent]
    arrays, _ = strategy.aggregate_train(1, failed)
    assert arrays is None
    assert strategy.round_stats[1]["train_failures"] == 2


def test_malformed_evaluate_reply_is_left_out_of_the_average():
    strategy = LoraFedAvg(learning_rate=lambda r: 0.1)
    sent = list(strategy.configure_evaluate(1, to_array_record(GLOBAL), ConfigRecord(), Grid(2)))

    def reply(message, loss, examples):
        return Message(RecordDict({"metrics": MetricRecord({"eval_loss": loss, "num-examples": examples})}),
                       reply_to=message)

    metrics = strategy.aggregate_evaluate(1, [reply(sent[0], 2.0, 5), reply(sent[1], float("nan"), 5)])
    assert metrics["eval_loss"] == pytest.approx(2.0)
    assert strategy.round_stats[1]["eval_rejected"] == 1
    assert np.isfinite(strategy.round_stats[1]["eval_loss"])


def test_lost_and_failed_nodes_are_logged_and_the_round_goes_on(caplog):
    strategy, sent = _strategy(nodes=3)
    # Node 1 is the SuperLink's own ID in Flower (it answers for lost nodes): let node 1 be the good one.
    sent.sort(key=lambda message: message.metadata.dst_node_id)
    failed = Message(Error(code=0, reason="client raised"), reply_to=sent[1])
    # sent[2]'s node never answers (stopped mid-round): its reply is simply absent at the timeout.
    arrays, _ = strategy.aggregate_train(1, [train_reply(sent[0], A, examples=30), failed])
    assert torch.allclose(arrays.to_torch_state_dict()["x.lora_A.weight"], A["x.lora_A.weight"])
    stats = strategy.round_stats[1]
    assert (stats["train_sampled"], stats["train_replies"], stats["train_failures"]) == (3, 1, 1)
    assert stats["train_examples"] == 30
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"Round 1: train failed, reported by node {sent[1].metadata.dst_node_id}: client raised" in warnings
    assert any("1 of 3 sampled nodes sent no train reply within strategy.round-timeout" in w for w in warnings)


def test_exact_match_is_summed_over_clients_whatever_tasks_each_holds():
    strategy = LoraFedAvg(learning_rate=lambda r: 0.1)
    sent = list(strategy.configure_evaluate(1, to_array_record(GLOBAL), ConfigRecord(), Grid(2)))

    def reply(message, examples, counts):
        metrics = MetricRecord({"eval_loss": 2.0, "num-examples": examples, **counts})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    # Client 1 holds only task a; client 2 tasks a and b: both replies are valid and summed.
    first = {"exact-match-correct": 1, "exact-match-total": 4, "exact-match-correct/a": 1, "exact-match-total/a": 4}
    second = {"exact-match-correct": 5, "exact-match-total": 8, "exact-match-correct/a": 2, "exact-match-total/a": 2,
              "exact-match-correct/b": 3, "exact-match-total/b": 6}
    metrics = strategy.aggregate_evaluate(1, [reply(sent[0], 4, first), reply(sent[1], 8, second)])
    stats = strategy.round_stats[1]
    assert stats["eval_rejected"] == 0 and metrics["eval_loss"] == pytest.approx(2.0)
    assert stats["eval_exact_match"] == pytest.approx(6 / 12) and stats["eval_exact_match_examples"] == 12
    assert stats["eval_exact_match_per_task"] == pytest.approx({"a": 3 / 6, "b": 3 / 6})
