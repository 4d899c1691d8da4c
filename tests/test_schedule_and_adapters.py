"""Pure pieces: the learning-rate schedule, adapters through ArrayRecord, and updates on the wire."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from flowertune_llm.client.model import build_adapter_skeleton
from flowertune_llm.client.training import cosine_learning_rate, round_seed
from flowertune_llm.shared.adapters import (
    adapter_state,
    apply_update,
    from_array_record,
    load_adapter_state,
    send_update_mod,
    to_array_record,
    transfer_dtype_of,
    update_record,
)
from flowertune_llm.shared.flower_compat import act_as_server_app


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


def test_adapter_state_is_a_copy_not_a_view_of_the_weights(config):
    skeleton = build_adapter_skeleton(config.model, seed=0)
    state = adapter_state(skeleton)
    before = {k: v.clone() for k, v in state.items()}
    for parameter in skeleton.parameters():
        if parameter.device.type != "meta":
            parameter.data.add_(1.0)
    assert all(torch.equal(state[k], before[k]) for k in state)


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
    # Payload = values x width, plus per array numpy's small header and the key's name.
    names = sum(len(name) for name in state)
    assert values * bytes_per_value + names <= record.count_bytes() <= values * bytes_per_value + names + 160 * len(state)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_an_update_on_the_wire_gives_back_the_trained_adapter(config, dtype):
    # A step of 1e-5 per entry, far below a 16-bit unit of the weights (peft's init, |w| up to 0.09).
    received_f32 = adapter_state(build_adapter_skeleton(config.model, seed=0))
    received = to_array_record(received_f32, dtype)
    as_received = from_array_record(received)  # what the client starts training from
    step = {n: 1e-5 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) for n, t in received_f32.items()}
    trained = to_array_record({n: as_received[n].float() + step[n] for n in step})
    update = update_record(trained, received, dtype)
    assert transfer_dtype_of(update) == dtype
    rebuilt = from_array_record(apply_update(to_array_record(received_f32), update))
    # float32: the client's own float32 sum w + step keeps the step to about ulp(w) / step = 1e-3;
    # float16: steps of 1e-5 are subnormal there (below 6.1e-5), with a spacing of 6e-8;
    # bfloat16: 8 significant bits, relative error 2^-9 per value.
    tolerance = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 2**-8}[dtype]
    for name in step:
        moved = rebuilt[name] - received_f32[name]
        assert rebuilt[name].dtype == torch.float32
        assert float((moved - step[name]).norm() / step[name].norm()) < tolerance


def test_send_update_mod_gives_the_handler_float32_and_sends_the_update(config, monkeypatch):
    act_as_server_app(monkeypatch.setattr)  # Messages outside a run
    received_f32 = adapter_state(build_adapter_skeleton(config.model, seed=0))
    message = Message(RecordDict({"arrays": to_array_record(received_f32, "bfloat16")}), dst_node_id=1,
                      message_type="train")
    seen = {}

    def handler(msg: Message, context: Context) -> Message:
        seen.update(from_array_record(msg.content["arrays"]))
        trained = {n: t + 0.5 for n, t in seen.items()}
        return Message(RecordDict({"arrays": to_array_record(trained)}), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = send_update_mod(message, context, handler)
    assert {t.dtype for t in seen.values()} == {torch.float32}
    assert transfer_dtype_of(reply.content["arrays"]) == "bfloat16"
    assert all(torch.equal(t.float(), torch.full_like(t.float(), 0.5)) for t in from_array_record(reply.content["arrays"]).values())


def test_unknown_transfer_dtype_is_refused(config):
    with pytest.raises(ValueError, match="transfer dtype must be one of float32, float16, bfloat16, got 'int8'"):
        to_array_record({"a": torch.zeros(2)}, "int8")
