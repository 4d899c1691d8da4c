"""Model building: real bitsandbytes layers, LoRA-only training, and clear errors for bad sources."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft.tuners.lora import LoraLayer

from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.model import (
    ModelSourceError,
    build_adapter_skeleton,
    build_peft_model,
    load_model_config,
    load_tokenizer,
    lora_config,
    quantization_config,
)
from flowertune_llm.client.training import evaluate_loss, train_adapter
from flowertune_llm.shared.adapters import adapter_state
from flowertune_llm.shared.settings import parse_config

from conftest import default_run_config


def _config(**overrides):
    return parse_config(default_run_config(**overrides))


def test_quantization_configs():
    four = quantization_config(_config().model)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    eight = quantization_config(_config(**{"model.quantization": 8}).model)
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert quantization_config(_config(**{"model.quantization": 16}).model) is None


def test_lora_config_uses_the_settings():
    lora = lora_config(_config(**{"model.lora.r": 4, "model.lora.target-modules": "q_proj,v_proj"}).model)
    assert lora.r == 4 and lora.lora_alpha == 32 and set(lora.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize(("bits", "layer_type"), [(4, bnb.nn.Linear4bit), (8, bnb.nn.Linear8bitLt)])
def test_base_layers_are_really_quantized(bits, layer_type):
    model = build_peft_model(_config(**{"model.quantization": bits}).model)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, layer_type)
    if bits == 4:
        assert q_proj.weight.quant_state.quant_type == "nf4"
        assert q_proj.weight.dtype == torch.uint8
    else:
        assert q_proj.weight.dtype == torch.int8
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_skeleton_has_the_clients_adapter_keys_and_shapes(config):
    client_state = adapter_state(build_peft_model(config.model))
    server_state = adapter_state(build_adapter_skeleton(config.model, seed=0))
    assert {k: v.shape for k, v in client_state.items()} == {k: v.shape for k, v in server_state.items()}


def _base_function(model) -> dict[str, torch.Tensor]:
    """Outputs of every frozen layer on a fixed input, and every unquantized frozen tensor.

    bitsandbytes repacks 4-bit weights for its CPU kernel on first use, so quantized layers
    are compared by what they compute rather than by their storage layout.
    """
    torch.manual_seed(0)
    snapshot = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                probe = torch.randn(3, module.base_layer.in_features, dtype=torch.bfloat16)
                snapshot[name] = module.base_layer(probe).float().clone()
        for name, parameter in model.named_parameters():
            if "lora_" not in name and parameter.dtype.is_floating_point:
                snapshot[name] = parameter.detach().float().clone()
    return snapshot


def test_local_training_moves_lora_weights_only_and_lowers_loss(config):
    model = build_peft_model(config.model)
    tokenizer = load_tokenizer(config.model)
    train_data, eval_data = load_client_data(config.dataset, 0, 2)
    lora_before = adapter_state(model)
    loss_before = evaluate_loss(model, tokenizer, eval_data, config.train)
    base_before = _base_function(model)
    train_adapter(model, tokenizer, train_data, config.train, learning_rate=2e-3, seed=0)  # the pretrained base: 1e-2 overshoots in one round
    base_after = _base_function(model)
    assert base_before.keys() == base_after.keys() and len(base_before) > 14
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)
    lora_after = adapter_state(model)
    changed = [name for name in lora_before if not torch.equal(lora_before[name], lora_after[name])]
    assert len(changed) == len(lora_before)
    assert evaluate_loss(model, tokenizer, eval_data, config.train) < loss_before


def test_unreachable_hub_model_fails_with_advice():
    settings = _config(**{"model.name": "openlm-research/open_llama_3b_v2"}).model
    with pytest.raises(ModelSourceError, match=r"cannot load 'openlm-research/open_llama_3b_v2'.*builtin:tiny-llama"):
        load_model_config(settings)


def test_folder_that_is_not_a_model_is_refused(tmp_path):
    settings = _config(**{"model.name": str(tmp_path)}).model
    with pytest.raises(ModelSourceError, match="not a model folder"):
        load_model_config(settings)
