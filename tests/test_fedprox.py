"""FedProx's proximal term in local training: it keeps the local adapter near the global one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.model import build_adapter_skeleton, build_peft_model, load_tokenizer
from flowertune_llm.client.training import train_adapter
from flowertune_llm.shared.adapters import adapter_state, load_adapter_state

MICRO_BATCHES = 2  # gradient-accumulation steps per optimizer step


def _distance(adapter: dict, origin: dict) -> float:
    return float(torch.sqrt(sum(((adapter[k] - origin[k]) ** 2).sum() for k in origin)))


class _ForwardRecorder:
    """Records each training forward's batch and the trainable weights it ran with."""

    def __init__(self, model):
        self.model = model
        self.calls: list[tuple[dict, dict]] = []
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        batch = {key: kwargs[key].detach().clone() for key in ("input_ids", "attention_mask", "position_ids", "labels")
                 if isinstance(kwargs.get(key), torch.Tensor)}
        weights = {name: p.detach().clone() for name, p in self.model.named_parameters() if p.requires_grad}
        self.calls.append((batch, weights))


def _data_loss_per_step(model, calls) -> list[float]:
    """Recompute each optimizer step's completion-token loss from its batches, without the trainer."""
    params = dict(model.named_parameters())
    nll, tokens = [], []
    model.eval()
    with torch.no_grad():
        for batch, weights in calls:
            for name, value in weights.items():
                params[name].data.copy_(value)
            inputs = {key: value for key, value in batch.items() if key != "labels"}
            # The trainer computes under bf16 autocast (a quantized base); so does the check.
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(**inputs, use_cache=False).logits
            targets = batch["labels"][:, 1:]
            counted = targets != -100
            nll.append(float(F.cross_entropy(logits[:, :-1][counted].float(), targets[counted], reduction="sum")))
            tokens.append(int(counted.sum()))
    steps = range(0, len(calls), MICRO_BATCHES)
    return [sum(nll[s:s + MICRO_BATCHES]) / sum(tokens[s:s + MICRO_BATCHES]) for s in steps]


@pytest.fixture(scope="module")
def fedprox_rounds(request):
    """Train one round from the same global adapter, data and seed with each mu.

    Returns the distances moved, the reported losses and, for mu=1, the data loss of each step
    recomputed from the recorded batches, with the proximal term (mu/2)·||w − w_global||² at each step.
    """
    from flowertune_llm.shared.settings import parse_config

    from conftest import default_run_config

    config = parse_config(default_run_config())
    # No dropout, so that a forward outside the trainer sees what the trainer's forward saw.
    model_settings = dataclasses.replace(config.model, lora=dataclasses.replace(config.model.lora, dropout=0.0))
    # Two gradient-accumulation micro-batches per step: the term must count once per optimizer step.
    settings = dataclasses.replace(config.train, max_steps=4, batch_size=8, gradient_accumulation_steps=MICRO_BATCHES)
    model = build_peft_model(model_settings)
    tokenizer = load_tokenizer(model_settings)
    train_data, _ = load_client_data(config.dataset, 0, 2)
    global_adapter = adapter_state(build_adapter_skeleton(model_settings, seed=3))
    distances, losses = {}, {}
    for mu in (0.0, 0.1, 1.0):
        load_adapter_state(model, global_adapter)
        recorder = _ForwardRecorder(model) if mu == 1.0 else None
        outcome = train_adapter(model, tokenizer, train_data, settings, learning_rate=1e-2, seed=5, proximal_mu=mu)
        distances[mu] = _distance(adapter_state(model), global_adapter)
        losses[mu] = outcome.loss
        if recorder:
            recorder.handle.remove()
            calls = recorder.calls
    assert len(calls) == settings.max_steps * MICRO_BATCHES
    # The first forward ran with the global adapter as received: the proximal term's anchor.
    step_weights = [weights for _, weights in calls[::MICRO_BATCHES]]
    anchors = step_weights[0]
    penalties = [0.5 * 1.0 * sum(float(((value - anchors[name]).float() ** 2).sum()) for name, value in weights.items())
                 for weights in step_weights]
    return distances, losses, _data_loss_per_step(model, calls), penalties


def test_proximal_term_keeps_the_local_adapter_closer_to_the_global_one(fedprox_rounds):
    distances, _, _, _ = fedprox_rounds
    assert distances[0.0] > 0
    assert distances[0.1] < distances[0.0]
    # A stronger pull stays closer still (in this range: with Adam, whose steps are about the learning
    # rate per value whatever the gradient, a far larger mu only makes the weights hop around the start).
    assert distances[1.0] < distances[0.1]


def test_reported_loss_is_the_data_loss(fedprox_rounds):
    # The proximal term shapes the step, not the reported loss: the trainer's loss with mu=1 is the
    # mean over steps of each step's data loss (recomputed here from the batches it trained on and
    # the weights it had), never the data loss plus (mu/2)·||w − w_global||².
    _, losses, data_losses, penalties = fedprox_rounds
    data_loss = sum(data_losses) / len(data_losses)
    with_term = sum(d + p for d, p in zip(data_losses, penalties)) / len(data_losses)
    # Measured: equal to 6 digits (1.558906 both, 2026-12-06).
    assert losses[1.0] == pytest.approx(data_loss, rel=2e-3)
    # The check can tell them apart: the term moves the mean by far more than the tolerance.
    assert abs(with_term - data_loss) > 0.05 * data_loss
