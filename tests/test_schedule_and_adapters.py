"""Pure pieces: the learning-rate schedule and adapters through ArrayRecord in each transfer precision."""

from __future__ import annotations

import pytest
import torch
from flowertune_llm.adapters import (
    adapter_state,
    from_array_record,
    load_adapter_state,
    record_bytes,
    to_array_record,
    to_float32,
)
from flowertune_llm.model import build_adapter_skeleton
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


@pytest.mark.parametrize("dtype, wire, bytes_per_value", [
    ("float32", "float32", 4), ("float16", "float16", 2), ("bfloat16", "uint16", 2),
])
def test_transfer_precision_sets_wire_dtype_and_size(config, dtype, wire, bytes_per_value):
    state = adapter_state(build_adapter_skeleton(config.model, seed=0))
    record = to_array_record(state, dtype)
    values = sum(t.numel() for t in state.values())
    assert {array.dtype for array in record.values()} == {wire}
    # Payload = values x width, plus numpy's small per-array header.
    assert values * bytes_per_value <= record_bytes(record) <= values * bytes_per_value + 160 * len(state)


def test_bfloat16_transfer_is_exact_for_bfloat16_weights_and_averages_as_float32(config):
    state = adapter_state(build_adapter_skeleton(config.model, seed=0))
    trained_in_bf16 = {name: t.to(torch.bfloat16).float() for name, t in state.items()}
    back = from_array_record(to_array_record(trained_in_bf16, "bfloat16"))
    assert all(back[n].dtype == torch.bfloat16 and torch.equal(back[n].float(), trained_in_bf16[n]) for n in back)
    as_float32 = to_float32(to_array_record(trained_in_bf16, "bfloat16"))
    assert {array.dtype for array in as_float32.values()} == {"float32"}


def test_unknown_transfer_dtype_is_refused(config):
    with pytest.raises(ValueError, match="transfer dtype must be one of float32, float16, bfloat16, got 'int8'"):
        to_array_record({"a": torch.zeros(2)}, "int8")
