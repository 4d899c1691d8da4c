"""The chunked training loss (train.loss-chunk-tokens) equals the full-logits loss, gradients included."""

from __future__ import annotations

import tempfile

import pytest
import torch

from flowertune_llm.client import training
from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.model import build_peft_model, load_tokenizer
from flowertune_llm.shared.settings import parse_config
from flowertune_llm.tools.memory_report import full_logits_loss

from conftest import default_run_config, first_step_loss_and_gradients


def _loss_and_gradients(model, tokenizer, config, data, chunk_tokens, loss_func=None):
    config.train.loss_chunk_tokens = chunk_tokens
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = training._trainer(model, tokenizer, config.train, 0.01, 1, output_dir, train_data=data,
                                    compute_loss_func=loss_func)
        loss, _, gradients = first_step_loss_and_gradients(trainer, model)
    return loss, gradients


@pytest.mark.parametrize("model_name", ["builtin:tiny-llama", "builtin:tiny-phi"])  # Phi's LM head has a bias
def test_chunked_loss_matches_the_full_logits_loss(model_name):
    config = parse_config(default_run_config(**{"model.name": model_name}))
    data, _ = load_client_data(config.dataset, 0, 2)
    tokenizer = load_tokenizer(config.model)
    torch.manual_seed(0)
    model = build_peft_model(config.model)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B = 0 at initialisation would leave A without gradient
            parameter.data.normal_(0, 0.05)

    full_loss, full_grads = _loss_and_gradients(model, tokenizer, config, data, 0, full_logits_loss)
    chunk_loss, chunk_grads = _loss_and_gradients(model, tokenizer, config, data, 100)
    assert full_grads and full_grads.keys() == chunk_grads.keys()
    assert chunk_loss == pytest.approx(full_loss, rel=1e-6)
    for name in full_grads:
        # Per tensor, relative to its size: the two paths round differently in bf16 (entries near 0
        # differ by ~1e-6), a wrong chunking would be off by the gradient's own size.
        difference = (chunk_grads[name] - full_grads[name]).norm() / full_grads[name].norm()
        assert difference < 1e-3, (name, float(difference))


def test_training_with_a_chunked_loss_moves_the_adapter():
    config = parse_config(default_run_config(**{"train.loss-chunk-tokens": 256, "train.max-steps": 6}))
    data, _ = load_client_data(config.dataset, 0, 2)
    model = build_peft_model(config.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    outcome = training.train_adapter(model, load_tokenizer(config.model), data, config.train, 0.01, seed=1)
    assert torch.isfinite(torch.tensor(outcome.loss))
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n)
