"""What travels: the LoRA state dict, converted to and from Flower's ArrayRecord in one place.

Only adapter tensors are read from or written to a model here, so base weights can never enter a
message. bf16 is not representable in an ArrayRecord (and FedAvg multiplies numpy arrays), so
adapters travel as float32 and are cast back to the model's LoRA dtype on arrival.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

TRANSFER_DTYPE = torch.float32


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """Return a detached float32 copy of the model's LoRA weights, keyed as peft saves them."""
    return OrderedDict(
        (name, tensor.detach().to("cpu", TRANSFER_DTYPE).contiguous())
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


def to_array_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """Pack an adapter state dict into an ArrayRecord."""
    return ArrayRecord(OrderedDict((name, tensor.to(TRANSFER_DTYPE)) for name, tensor in state.items()))


def from_array_record(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """Unpack an ArrayRecord into an adapter state dict."""
    return OrderedDict(record.to_torch_state_dict())
