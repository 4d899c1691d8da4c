"""The frozen embedding and LM head stay in bf16 on a quantized base, and training is unchanged by it."""

from __future__ import annotations

import pytest
import torch

from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.model import build_peft_model, load_tokenizer, resolve_model_path
from flowertune_llm.client.training import evaluate_loss, train_adapter
from flowertune_llm.shared.adapters import adapter_state
from flowertune_llm.shared.settings import parse_config

from conftest import default_run_config


@pytest.mark.parametrize("bits", [4, 8])
def test_bf16_embeddings_train_bit_identically_to_peft_fp32_copies(bits):
    config = parse_config(default_run_config(**{"model.quantization": bits, "train.max-steps": 3}))
    resolve_model_path(config.model.name)  # build the tiny model first: building it reseeds torch
    train_data, eval_data = load_client_data(config.dataset, 0, 2)
    tokenizer = load_tokenizer(config.model)
    outcomes = {}
    for upcast in (True, False):
        torch.manual_seed(0)
        model = build_peft_model(config.model, upcast_embeddings=upcast)
        base = model.get_base_model()
        weights = (base.get_input_embeddings().weight, base.get_output_embeddings().weight)
        assert all(w.dtype == (torch.float32 if upcast else torch.bfloat16) for w in weights)
        loss = train_adapter(model, tokenizer, train_data, config.train, learning_rate=0.01, seed=1).loss
        outcomes[upcast] = (loss, evaluate_loss(model, tokenizer, eval_data, config.train), adapter_state(model))
    (loss_a, eval_a, adapter_a), (loss_b, eval_b, adapter_b) = outcomes[True], outcomes[False]
    assert loss_a == loss_b and eval_a == eval_b
    assert all(torch.equal(adapter_a[key], adapter_b[key]) for key in adapter_a)
