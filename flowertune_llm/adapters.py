"""What travels: the LoRA state dict, converted to and from Flower's ArrayRecord in one place.

Only adapter tensors are read from or written to a model here, so base weights can never enter a
message. Adapters travel in the `transfer.dtype` precision:
  float32   4 bytes a value; exact.
  float16   2 bytes; numpy-native, but narrower range than the bf16 LoRA weights trl trains.
  bfloat16  2 bytes; exactly the precision clients train LoRA weights in on a quantized base.
ArrayRecord cannot hold bfloat16 (NOTES.md), so a bfloat16 tensor travels as its raw 16 bits in a
uint16 array: adapters hold only floating-point weights, so a uint16 array in an adapter record can
only be such bits. Averaging must not happen on those bits (nor in fp16): `decode` gives tensors
back as real values, and the server averages them in float32.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

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
    """Return the record with every adapter tensor as float32 values, ready for averaging."""
    return to_array_record(from_array_record(record), "float32")


def record_bytes(record: ArrayRecord) -> int:
    """Return the payload size of an ArrayRecord: the bytes its tensors take on the wire."""
    return sum(len(array.data) for array in record.values())
