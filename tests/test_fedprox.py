"""FedProx's proximal term in local training: it keeps the local adapter near the global one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.model import build_adapter_skeleton, build_peft_model, load_tokenizer
from flowertune_llm.client.training import train_adapter
from flowertune_llm.shared.adapters import adapter_state, load_adapter_state


def _distance(adapter: dict, origin: dict) -> float:
    return float(torch.sqrt(sum(((adapter[k] - origin[k]) ** 2).sum() for k in origin)))


@pytest.fixture(scope="module")
def trained_distances(request):
    """Train one round from the same global adapter, data and seed with each mu; return distances moved."""
    from flowertune_llm.shared.settings import parse_config

    from conftest import default_run_config

    config = parse_config(default_run_config())
    # Two gradient-accumulation micro-batches per step: the term must count once per optimizer step.
    settings = dataclasses.replace(config.train, max_steps=4, batch_size=8, gradient_accumulation_steps=2)
    model = build_peft_model(config.model)
    tokenizer = load_tokenizer(config.model)
    train_data, _ = load_client_data(config.dataset, 0, 2)
    global_adapter = adapter_state(build_adapter_skeleton(config.model, seed=3))
    distances, losses = {}, {}
    for mu in (0.0, 0.1, 1.0):
        load_adapter_state(model, global_adapter)
        outcome = train_adapter(model, tokenizer, train_data, settings, learning_rate=1e-2, seed=5, proximal_mu=mu)
        distances[mu] = _distance(adapter_state(model), global_adapter)
        losses[mu] = outcome.loss
    return distances, losses


def test_proximal_term_keeps_the_local_adapter_closer_to_the_global_one(trained_distances):
    distances, _ = trained_distances
    assert distances[0.0] > 0
    assert distances[0.1] < distances[0.0]
    # A stronger pull stays closer still (in this range: with Adam, whose steps are about the learning
    # rate per value whatever the gradient, a far larger mu only makes the weights hop around the start).
    assert distances[1.0] < distances[0.1]


def test_reported_loss_is_the_data_loss(trained_distances):
    # The proximal term shapes the step, not the reported loss: with mu the loss is the data loss of
    # a model pulled back towards the start, never the data loss plus (mu/2)·||w − w_global||².
    _, losses = trained_distances
    assert all(0 < loss < 20 for loss in losses.values())
    assert losses[1.0] != losses[0.0]
