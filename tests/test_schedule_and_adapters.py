"""Pure pieces: the learning-rate schedule, adapters through ArrayRecord, and FedAvg's weighting."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from flwr.supercore.task_identity import TaskIdentity

from flowertune_llm.adapters import adapter_state, from_array_record, load_adapter_state, to_array_record
from flowertune_llm.model import build_adapter_skeleton
from flowertune_llm.strategy import LEARNING_RATE_KEY, LoraFedAvg
from flowertune_llm.training import cosine_learning_rate, round_seed


def test_cosine_schedule_starts_at_max_and_ends_at_min():
    rates = [cosine_learning_rate(r, 10, 5e-5, 1e-6) for r in range(1, 11)]
    assert rates[0] == pytest.approx(5e-5)
    assert rates[-1] == pytest.approx(1e-6)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # Halfway through the rounds, halfway between the bounds.
    assert cosine_learning_rate(3, 5, 1.0, 0.0) == pytest.approx(0.5)


def test_single_round_uses_max_learning_rate():
    assert cosine_learning_rate(1, 1, 0.1, 0.01) == 0.1


def test_round_seed_differs_per_round_and_client():
    seeds = {round_seed(42, r, p) for r in range(1, 4) for p in range(3)}
    assert len(seeds) == 9


def test_adapter_round_trips_exactly_through_array_record(config):
    skeleton = build_adapter_skeleton(config.model, seed=0)
    state = adapter_state(skeleton)
    back = from_array_record(to_array_record(state))
    assert list(back) == list(state)
    for name in state:
        assert back[name].dtype == torch.float32
        assert torch.equal(back[name], state[name])


def test_bf16_lora_weights_travel_as_float32_and_come_back_unchanged(config):
    skeleton = build_adapter_skeleton(config.model, seed=0)
    skeleton.to(torch.bfloat16)
    original = {k: v.clone() for k, v in skeleton.state_dict().items() if "lora_" in k}
    record = to_array_record(adapter_state(skeleton))
    assert {array.dtype for array in record.values()} == {"float32"}
    for parameter in skeleton.parameters():
        if parameter.device.type != "meta":
            parameter.data.zero_()
    load_adapter_state(skeleton, from_array_record(record))
    restored = {k: v for k, v in skeleton.state_dict().items() if "lora_" in k}
    assert all(torch.equal(original[k], restored[k]) and restored[k].dtype == torch.bfloat16 for k in original)


def test_mismatched_adapter_is_refused(config):
    skeleton = build_adapter_skeleton(config.model, seed=0)
    state = adapter_state(skeleton)
    state.pop(next(iter(state)))
    state["base_model.model.lm_head.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="1 missing keys .* 1 unexpected keys"):
        load_adapter_state(skeleton, state)


def test_skeleton_starts_as_identity_adapter(config):
    state = adapter_state(build_adapter_skeleton(config.model, seed=0))
    lora_b = [t for k, t in state.items() if "lora_B" in k]
    lora_a = [t for k, t in state.items() if "lora_A" in k]
    assert lora_b and all(torch.count_nonzero(t) == 0 for t in lora_b)
    assert all(torch.count_nonzero(t) > 0 for t in lora_a)
    assert all("lora_" in k for k in state)


@pytest.fixture
def task_identity(monkeypatch):
    """Give this process the identity a ServerApp has, so Messages can be built outside a run."""
    for attribute, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attribute, value)


def _train_reply(instruction: Message, arrays: dict[str, torch.Tensor], loss: float, examples: int) -> Message:
    metrics = MetricRecord({"train_loss": loss, "num-examples": examples})
    return Message(RecordDict({"arrays": ArrayRecord(OrderedDict(arrays)), "metrics": metrics}), reply_to=instruction)


def test_fedavg_of_adapters_is_the_example_weighted_mean(task_identity):
    strategy = LoraFedAvg(learning_rate=lambda r: 0.1)
    instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1, message_type=MessageType.TRAIN)
    a = {"x.lora_A.weight": torch.tensor([[1.0, 2.0]]), "x.lora_B.weight": torch.tensor([[4.0]])}
    b = {"x.lora_A.weight": torch.tensor([[3.0, -2.0]]), "x.lora_B.weight": torch.tensor([[0.0]])}
    arrays, metrics = strategy.aggregate_train(
        1, [_train_reply(instruction, a, 2.0, 30), _train_reply(instruction, b, 1.0, 10)]
    )
    averaged = arrays.to_torch_state_dict()
    for name in a:
        expected = (30 * a[name] + 10 * b[name]) / 40
        assert torch.allclose(averaged[name], expected)
    assert metrics["train_loss"] == pytest.approx((30 * 2.0 + 10 * 1.0) / 40)
    assert strategy.round_stats[1]["train_replies"] == 2
    assert strategy.round_stats[1]["train_loss"] == pytest.approx(1.75)


def test_train_config_carries_round_learning_rate(task_identity):
    class TwoNodeGrid:
        def get_node_ids(self):
            return [1, 2]

    strategy = LoraFedAvg(learning_rate=lambda r: 1.0 / r)
    config = ConfigRecord()
    messages = list(strategy.configure_train(4, ArrayRecord(), config, TwoNodeGrid()))
    assert len(messages) == 2
    sent = messages[0].content["config"]
    assert sent[LEARNING_RATE_KEY] == pytest.approx(0.25) and sent["server-round"] == 4
    assert math.isclose(strategy.round_stats[4]["learning_rate"], 0.25)
