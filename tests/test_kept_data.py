"""Data trl prepared in one round is reused in later rounds of the same process, with exactly the same results."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from trl import SFTConfig, SFTTrainer

from flowertune_llm.client import kept_data, kept_model, training
from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.model import build_adapter_skeleton, build_peft_model, load_tokenizer
from flowertune_llm.shared.adapters import adapter_state, load_adapter_state
from flowertune_llm.shared.settings import parse_config

from conftest import default_run_config


@pytest.fixture
def preparations(monkeypatch) -> list[int]:
    """Count trl's dataset preparations (one entry, the rows prepared, per call)."""
    calls = []
    prepare = SFTTrainer._prepare_dataset

    def counted(self, dataset, *args, **kwargs):
        prepared = prepare(self, dataset, *args, **kwargs)
        calls.append(len(prepared))
        return prepared

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", counted)
    return calls


def _config(**overrides):
    return parse_config(default_run_config(**overrides))


def _rows(dataset) -> list[tuple[list[int], list[int]]]:
    return list(zip(dataset["input_ids"], dataset["labels"], strict=True))


def _trainer(model, config, data, tmp_path, seed=1):
    return training._trainer(model, load_tokenizer(config.model), config.train, 1e-3, seed, str(tmp_path), train_data=data)


def test_a_later_trainer_on_the_same_data_gets_the_rows_trl_prepared_before(preparations, tmp_path):
    config = _config()
    model = build_peft_model(config.model)
    train_data, _ = load_client_data(config.dataset, 0, 2)
    first = _trainer(model, config, train_data, tmp_path, seed=1).train_dataset
    # The next round: the data loaded again (same fingerprint), another seed and tokenizer object.
    again, _ = load_client_data(config.dataset, 0, 2)
    second = _trainer(model, config, again, tmp_path, seed=2).train_dataset
    assert preparations == [len(first)]
    assert second is first
    kept_data.forget()  # a fresh process prepares the same rows
    assert _rows(_trainer(model, config, train_data, tmp_path).train_dataset) == _rows(first)
    assert len(preparations) == 2


@pytest.mark.parametrize("change", [
    {"train.seq-length": 64},                               # rows truncated elsewhere
    {"train.packing": True, "train.padding-free": False},   # rows packed
])
def test_a_setting_that_changes_the_prepared_rows_prepares_again(change, preparations, tmp_path):
    config = _config()
    model = build_peft_model(config.model)
    train_data, _ = load_client_data(config.dataset, 0, 2)
    default = _trainer(model, config, train_data, tmp_path).train_dataset
    changed = _trainer(model, _config(**change), train_data, tmp_path).train_dataset
    assert len(preparations) == 2
    assert _rows(changed) != _rows(default)
    # Both are kept: going back to the default reuses its rows.
    assert _trainer(model, config, train_data, tmp_path).train_dataset is default
    assert len(preparations) == 2


def test_other_data_or_another_tokenizer_prepares_again(preparations, tmp_path):
    config = _config()
    model = build_peft_model(config.model)
    train_data, held_out = load_client_data(config.dataset, 0, 2)
    other_node, _ = load_client_data(config.dataset, 1, 2)
    _trainer(model, config, train_data, tmp_path)
    _trainer(model, config, other_node, tmp_path)
    _trainer(model, config, held_out, tmp_path)
    assert len(preparations) == 3
    tokenizer = load_tokenizer(config.model)
    tokenizer.eos_token = tokenizer.bos_token  # another EOS is appended to every completion
    trainer = training._trainer(model, tokenizer, config.train, 1e-3, 1, str(tmp_path), train_data=train_data)
    assert len(preparations) == 4
    assert trainer.train_dataset["labels"][0][-1] == tokenizer.bos_token_id


def test_the_key_names_fields_of_trls_config():
    # A field renamed by a trl release would silently drop out of the key (getattr gives None).
    assert set(kept_data.PREPARATION_FIELDS) <= {field.name for field in dataclasses.fields(SFTConfig)}


def test_at_most_max_kept_datasets_are_kept(monkeypatch):
    monkeypatch.setattr(kept_data, "MAX_KEPT", 2)
    for key in "abc":
        kept_data.keep(key, key)
    assert kept_data.prepared("a") is None and kept_data.prepared("b") == "b"
    kept_data.keep("d", "d")  # "b" was used last: "c" goes
    assert kept_data.prepared("c") is None and kept_data.prepared("b") == "b" and kept_data.prepared("d") == "d"


@pytest.mark.parametrize("batches", [
    {},                                                     # padding-free (the default)
    {"train.padding-free": False},                          # padded
    {"train.packing": True, "train.padding-free": False},   # packed training, unpacked held-out examples
])
def test_held_out_loss_is_trls_own_evaluation_and_prepared_once(batches, preparations, tmp_path):
    config = _config(**batches)
    model = build_peft_model(config.model)
    load_adapter_state(model, adapter_state(build_adapter_skeleton(config.model, seed=3)))
    tokenizer = load_tokenizer(config.model)
    held_out = load_client_data(config.dataset, 0, 2)[1].select(range(24))  # 2 batches, the last one short
    settings = dataclasses.replace(config.train, num_devices=1)

    losses = [training.evaluate_loss(model, tokenizer, held_out, config.train) for _ in range(2)]
    assert len(preparations) == 1  # once, for both evaluations
    # trl's own evaluation on a freshly built trainer, as the held-out loss was computed before
    # the data was kept: the held-out data prepared by trl as an evaluation set.
    kept_data.forget()
    with training.flattened_batches(model, settings):
        trainer = training._trainer(model, tokenizer, settings, 0.0, settings.seed, str(tmp_path), train_data=held_out)
        expected = trainer.evaluate(eval_dataset=held_out)["eval_loss"]
    assert losses == [expected, expected]


def _train_round(model, config, global_adapter, seed):
    load_adapter_state(model, global_adapter)
    train_data, held_out = load_client_data(config.dataset, 0, 2)
    outcome = training.train_adapter(model, load_tokenizer(config.model), train_data, config.train,
                                     learning_rate=1e-2, seed=seed)
    return outcome, adapter_state(model), held_out


@pytest.fixture
def no_kept_model():
    kept_model._kept = None
    yield
    kept_model._kept = None


@pytest.mark.integration  # per batch mode: two rounds in one process, one in a fresh one
@pytest.mark.parametrize("batches", [{}, {"train.packing": True, "train.padding-free": False}])
def test_a_later_round_on_kept_data_trains_exactly_like_a_fresh_process(batches, preparations, no_kept_model):
    config = _config(**{"train.max-steps": 3, **batches})
    global_adapter = adapter_state(build_adapter_skeleton(config.model, seed=7))
    model = kept_model.peft_model(config.model, reuse=True)
    _, first, held_out = _train_round(model, config, global_adapter, seed=1)
    training.evaluate_loss(model, load_tokenizer(config.model), held_out, config.train)
    prepared_in_round_1 = len(preparations)
    outcome, second, _ = _train_round(model, config, global_adapter, seed=2)
    assert len(preparations) == prepared_in_round_1 == 2  # training and held-out data, round 1 only

    kept_data.forget()  # a fresh process: nothing kept, the base built anew
    kept_model._kept = None
    fresh_outcome, fresh, _ = _train_round(build_peft_model(config.model), config, global_adapter, seed=2)
    assert len(preparations) == 3
    assert any(not torch.equal(first[name], second[name]) for name in first)  # the seeds do matter
    assert (outcome.loss, outcome.tokens) == (fresh_outcome.loss, fresh_outcome.tokens)
    for name in fresh:
        assert torch.equal(second[name], fresh[name]), name
