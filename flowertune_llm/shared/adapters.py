"""What travels: LoRA tensors, converted to and from Flower's ArrayRecord in one place.

Only adapter tensors are read from or written to a model here, so base weights can never enter a
message. The server keeps the global adapter in float32 and sends it in the `transfer.dtype`
precision; a client replies with its *update* (what it trained minus exactly what it received), in
the same precision; the server adds the mean update to its float32 adapter:
  float32   4 bytes a value; exact.
  float16   2 bytes; 11 significant bits, range up to 65504.
  bfloat16  2 bytes; 8 significant bits, float32's range.
Sending weights in 16 bits would round away any step smaller than half a unit in the last place
of the weight (for bf16, steps below |w| * 2^-9): at the reference learning rates most LoRA
entries would never move. An update is small, so its 16-bit rounding error is relative to the
update, not to the weight, and the float32 adapter on the server never rounds.
ArrayRecord cannot hold bfloat16 (NOTES.md), so a bfloat16 tensor travels as its raw 16 bits in a
uint16 array: adapters hold only floating-point weights, so a uint16 array in an adapter record can
only be such bits. Nothing is computed on those bits: `from_array_record` gives real values back.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from flowertune_llm.shared.protocol import ARRAYS

TRANSFER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# How each transfer dtype appears in an ArrayRecord (its `Array.dtype`).
WIRE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """Return a detached float32 copy of the model's LoRA weights, keyed as peft saves them."""
    return OrderedDict(
        (name, tensor.detach().to("cpu", torch.float32, copy=True).contiguous())
        for name, tensor in get_peft_model_state_dict(model).items()
    )


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA weights into the model, checking that the keys are exactly the model's."""
    expected = get_peft_model_state_dict(model)
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(
            f"Adapter does not match the model: {len(missing)} missing keys "
            f"{sorted(missing)[:3]}, {len(unexpected)} unexpected keys {sorted(unexpected)[:3]}. "
            "Were client and server started with the same model and model.lora.* settings?"
        )
    cast = {
        name: tensor.to(device=expected[name].device, dtype=expected[name].dtype)
        for name, tensor in state.items()
    }
    set_peft_model_state_dict(model, cast)


def _encode(tensor: torch.Tensor, dtype: str) -> Array:
    values = tensor.detach().to("cpu", TRANSFER_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        return Array(values.view(torch.int16).numpy().view(np.uint16))
    return Array(values.numpy())


def _decode(array: Array) -> torch.Tensor:
    values = array.numpy()
    if values.dtype == np.uint16:
        return torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(values.copy())


def to_array_record(state: dict[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """Pack an adapter state dict into an ArrayRecord, in transfer precision `dtype`."""
    if dtype not in TRANSFER_DTYPES:
        raise ValueError(f"transfer dtype must be one of {', '.join(TRANSFER_DTYPES)}, got {dtype!r}")
    return ArrayRecord(OrderedDict((name, _encode(tensor, dtype)) for name, tensor in state.items()))


def from_array_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """Unpack an ArrayRecord into an adapter state dict (bfloat16 bits become bfloat16 again)."""
    return OrderedDict((name, _decode(array)) for name, array in record.items())


def to_float32(record: ArrayRecord) -> ArrayRecord:
    """Return the record with every adapter tensor as float32 values."""
    return to_array_record(from_array_record(record), "float32")


def transfer_dtype_of(record: ArrayRecord) -> str:
    """Return the transfer precision a record travels in (float32 for an empty record)."""
    wire = {array.dtype for array in record.values()} or {"float32"}
    names = [name for name, dtype in WIRE_DTYPES.items() if dtype in wire]
    if len(wire) != 1 or not names:
        raise ValueError(f"adapter record has wire dtypes {sorted(wire)}; expected one of {sorted(WIRE_DTYPES.values())}")
    return names[0]


def update_record(trained: ArrayRecord, received: ArrayRecord, dtype: str) -> ArrayRecord:
    """Return trained minus received, computed in float32 and sent in transfer precision `dtype`.

    A tensor without a counterpart of its shape in `received` goes as it is, for the server's reply
    checks to name (`replies.py`).
    """
    before, after = from_array_record(received), from_array_record(trained)
    return to_array_record({
        name: value.float() - before[name].float()
        if name in before and before[name].shape == value.shape else value
        for name, value in after.items()
    }, dtype)


def apply_update(global_adapter: ArrayRecord, update: ArrayRecord) -> ArrayRecord:
    """Return the float32 adapter a client trained: the global adapter it received plus its update.

    Unknown or missing keys are left to the reply checks (`replies.py`), which run first.
    """
    base = from_array_record(global_adapter)
    delta = from_array_record(update)
    return to_array_record({name: base[name].float() + delta[name].float() for name in delta}, "float32")


def send_update_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: hand the handler the global adapter as float32 values; send back its update.

    The handler (and Flower's clipping mods inside this one) sees whole float32 adapters in and
    out. On the way out the reply's adapter becomes trained minus received, in the precision the
    global adapter came in.
    """
    received = msg.content[ARRAYS]
    dtype = transfer_dtype_of(received)
    msg.content[ARRAYS] = to_float32(received)
    reply = call_next(msg, context)
    if not reply.has_error() and isinstance(reply.content.get(ARRAYS), ArrayRecord):
        reply.content[ARRAYS] = update_record(reply.content[ARRAYS], msg.content[ARRAYS], dtype)
    return reply
