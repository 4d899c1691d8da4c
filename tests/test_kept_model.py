"""The base model kept between rounds gives exactly the adapter a freshly built one gives."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch

from flowertune_llm.client import kept_model
from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.model import build_adapter_skeleton, build_peft_model, load_tokenizer
from flowertune_llm.client.training import evaluate_loss, train_adapter
from flowertune_llm.shared.adapters import adapter_state, load_adapter_state


@pytest.fixture(autouse=True)
def empty_cache():
    kept_model._kept = None
    yield
    kept_model._kept = None


def _train_round(model, config, global_adapter, seed):
    load_adapter_state(model, global_adapter)
    train_data, _ = load_client_data(config.dataset, 0, 2)
    settings = dataclasses.replace(config.train, max_steps=3)
    train_adapter(model, load_tokenizer(config.model), train_data, settings, learning_rate=1e-2, seed=seed)
    return adapter_state(model)


@pytest.mark.integration  # per bit width: two rounds on the kept model, one on a fresh one
@pytest.mark.parametrize("bits", [4, 8])
def test_kept_model_trains_a_round_exactly_like_a_fresh_one(config, bits):
    config.model.quantization = bits
    global_adapter = adapter_state(build_adapter_skeleton(config.model, seed=7))

    kept = kept_model.peft_model(config.model, reuse=True)
    first = _train_round(kept, config, global_adapter, seed=1)  # round 1 leaves the model trained
    _, held_out = load_client_data(config.dataset, 0, 2)  # ... and evaluated, as in a real round
    evaluate_loss(kept, load_tokenizer(config.model), held_out, config.train)
    assert kept_model.peft_model(config.model, reuse=True) is kept
    second = _train_round(kept, config, global_adapter, seed=2)

    fresh = _train_round(build_peft_model(config.model), config, global_adapter, seed=2)
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the seeds do matter
    for name in fresh:
        assert torch.equal(second[name], fresh[name]), name


def test_no_reuse_or_other_settings_build_a_new_model(config):
    kept = kept_model.peft_model(config.model, reuse=True)
    assert kept_model.peft_model(config.model, reuse=False) is not kept
    kept = kept_model.peft_model(config.model, reuse=True)
    other = dataclasses.replace(config.model, lora=dataclasses.replace(config.model.lora, r=4))
    assert kept_model.peft_model(other, reuse=True) is not kept


class Cyclic:
    """A stand-in model in a reference cycle, as trl and accelerate leave a trained one: only a collection frees it."""

    def __init__(self) -> None:
        self.me = self


def test_a_kept_model_is_frozen_out_of_collections_until_replaced(config, monkeypatch):
    monkeypatch.setattr(kept_model, "build_peft_model", lambda settings: Cyclic())
    alive = weakref.ref(kept_model.peft_model(config.model, reuse=True))
    assert gc.get_freeze_count() > 0
    kept_model._kept = None
    gc.collect()
    assert alive() is not None  # frozen: collections pass it by
    other = dataclasses.replace(config.model, lora=dataclasses.replace(config.model.lora, r=4))
    kept_model.peft_model(other, reuse=True)  # the replacement hands it back to the collector
    assert alive() is None


def test_the_tokenizer_is_loaded_once_per_checkpoint(config, monkeypatch):
    loads = []
    monkeypatch.setattr(kept_model, "_kept_tokenizer", None)
    monkeypatch.setattr(kept_model, "load_tokenizer", lambda settings: loads.append(settings.name) or object())
    first = kept_model.kept_tokenizer(config.model)
    # Other LoRA or quantization settings: the same checkpoint, the same tokenizer.
    assert kept_model.kept_tokenizer(dataclasses.replace(config.model, quantization=8)) is first
    assert kept_model.kept_tokenizer(dataclasses.replace(config.model, name="elsewhere")) is not first
    assert loads == [config.model.name, "elsewhere"]


def test_evaluating_does_not_change_how_a_4bit_model_trains(config):
    config.model.lora.dropout = 0.0
    tokens = torch.randint(3, 512, (2, 24))

    def lora_gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        model = build_peft_model(config.model)
        inputs = tokens.to(model.device)  # the GPU where there is one, as the model
        torch.manual_seed(0)
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # non-zero B, so that A gets gradients too
                parameter.data = torch.randn_like(parameter) * 0.05
        # Forward passes under bf16 autocast, as the trainer runs them on a quantized base.
        with torch.autocast(model.device.type, dtype=torch.bfloat16):
            if evaluate_first:
                model.eval()
                with torch.no_grad():
                    model(inputs)
            model.train()
            model(inputs, labels=inputs).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    plain, after_evaluation = lora_gradients(False), lora_gradients(True)
    assert all(torch.count_nonzero(g) for g in plain.values())
    for name in plain:
        assert torch.equal(plain[name], after_evaluation[name]), name
