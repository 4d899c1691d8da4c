"""Config parsing: defaults parse, every key is known, and each bad value gets one clear message."""

from __future__ import annotations

import tomllib

import pytest
from flwr.common.config import flatten_dict, parse_config_args, unflatten_dict

from flowertune_llm.server.results import to_toml
from flowertune_llm.shared import settings
from flowertune_llm.shared.settings import CONFIG_KEYS, ConfigError, parse_config, to_run_config

from conftest import REPO_ROOT, default_run_config


def test_pyproject_declares_exactly_the_schema_keys():
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        pyproject = tomllib.load(handle)
    declared = set(flatten_dict(pyproject["tool"]["flwr"]["app"]["config"]))
    assert declared == set(CONFIG_KEYS)


def test_defaults_parse_into_typed_object(config):
    assert config.model.quantization == 4
    assert config.model.lora.target_module_list == "all-linear"
    assert isinstance(config.train.learning_rate_max, float)
    assert config.strategy.fraction_train == 1.0


def test_run_config_round_trips_through_saved_toml(config):
    flat = to_run_config(config)
    assert flat == default_run_config()
    assert parse_config(flatten_dict(tomllib.loads(to_toml(flat)))) == config


def test_saved_toml_keeps_quotes_backslashes_and_small_floats_and_flwr_reads_it(config, tmp_path):
    flat = {**to_run_config(config), "results.dir": 'C:\\runs\\"quoted" dir', "dataset.instruction-column": "tab\there ü",
            "train.learning-rate-max": 1e-05, "train.learning-rate-min": 5e-7}
    text = to_toml(flat)
    # One dotted `key = value` line per setting, as pyproject.toml's [tool.flwr.app.config] has them.
    assert text.splitlines()[1:3] == ['model.name = "builtin:tiny-llama"', "model.quantization = 4"]
    assert "train.learning-rate-max = 1e-05\n" in text
    assert len(text.splitlines()) == len(flat)
    assert flatten_dict(tomllib.loads(text)) == flat
    assert to_toml(unflatten_dict(flat)) == text
    saved = tmp_path / "run-config.toml"
    saved.write_text(text, encoding="utf-8")
    assert parse_config_args([str(saved)]) == flat  # what `flwr run --run-config FILE` reads
    assert to_run_config(parse_config(flat)) == flat


def test_target_modules_list():
    config = parse_config(default_run_config(**{"model.lora.target-modules": "q_proj, v_proj"}))
    assert config.model.lora.target_module_list == ["q_proj", "v_proj"]
    # peft's per-architecture default is peft's target_modules=None.
    assert parse_config(default_run_config(**{"model.lora.target-modules": "peft-default"})).model.lora.target_module_list is None


def test_padding_free_is_on_and_packing_off_by_default_and_both_parse_as_booleans(config):
    assert config.train.padding_free is True and config.train.packing is False
    switched = parse_config(default_run_config(**{"train.padding-free": False, "train.packing": True}))
    assert switched.train.padding_free is False and switched.train.packing is True


def test_integer_accepted_for_float_key():
    config = parse_config(default_run_config(**{"train.learning-rate-max": 1}))
    assert config.train.learning_rate_max == 1.0 and isinstance(config.train.learning_rate_max, float)


def test_a_config_parsed_again_is_an_equal_copy_and_a_bool_is_not_an_integer(run_config):
    parsed_before = settings._parsed_config.cache_info().misses
    first, again = parse_config(run_config), parse_config(dict(reversed(list(run_config.items()))))
    assert settings._parsed_config.cache_info().misses - parsed_before <= 1  # the key order does not matter
    assert again == first and again is not first
    again.train.seq_length += 1  # the caller's copy: the next parse does not see it
    assert parse_config(run_config) == first
    # True == 1 in Python: a parsed `1` must not answer for a `true`.
    parse_config({**run_config, "train.max-steps": 1})
    with pytest.raises(ConfigError, match="train.max-steps must be an integer, got True"):
        parse_config({**run_config, "train.max-steps": True})


BAD_VALUES = [
    ("model.quantization", 3, "model.quantization must be 4 or 8 (or 16 for an unquantized bf16 base), got 3"),
    ("model.quantization", "4", "model.quantization must be an integer, got '4'"),
    ("num-server-rounds", 0, "num-server-rounds must be >= 1, got 0"),
    ("num-server-rounds", 2.5, "num-server-rounds must be an integer, got 2.5"),
    ("model.gradient-checkpointing", 1, "model.gradient-checkpointing must be true or false, got 1"),
    ("model.lora.r", 0, "model.lora.r must be >= 1, got 0"),
    ("model.lora.r", True, "model.lora.r must be an integer, got True"),
    ("model.lora.alpha", -1.0, "model.lora.alpha must be > 0, got -1.0"),
    ("model.lora.dropout", 1.0, "model.lora.dropout must be in [0, 1), got 1.0"),
    ("model.lora.target-modules", "", "model.lora.target-modules must be 'all-linear', 'peft-default' or comma-separated"),
    ("model.lora.target-modules", "q_proj;v_proj", "model.lora.target-modules must be 'all-linear'"),
    ("model.name", " ", "model.name must be a hub id, a local folder or 'builtin:tiny-llama'"),
    ("dataset.name", "", "dataset.name must be a hub id"),
    ("dataset.partitioner", "random", "dataset.partitioner must be one of iid, dirichlet, natural-id, linear, square, exponential, got 'random'"),
    ("dataset.partitioner", "dirichlet", "dataset.partition-by must be a column name when dataset.partitioner is 'dirichlet'"),
    ("dataset.dirichlet-alpha", 0.0, "dataset.dirichlet-alpha must be > 0, got 0.0"),
    ("dataset.validation-fraction", 0.9, "dataset.validation-fraction must be in [0, 0.5], got 0.9"),
    ("dataset.validation-fraction", 0.0, "dataset.validation-fraction must be > 0 when strategy.fraction-evaluate > 0"),
    ("train.seq-length", 8, "train.seq-length must be >= 16, got 8"),
    ("train.learning-rate-max", 0.0, "train.learning-rate-max must be > 0, got 0.0"),
    ("train.learning-rate-max", float("nan"), "train.learning-rate-max must be > 0, got nan"),
    ("train.learning-rate-min", 1.0, "train.learning-rate-min must be in [0, train.learning-rate-max=0.005], got 1.0"),
    ("train.batch-size", 0, "train.batch-size must be >= 1, got 0"),
    ("train.gradient-accumulation-steps", 0, "train.gradient-accumulation-steps must be >= 1, got 0"),
    ("train.max-steps", -5, "train.max-steps must be >= 1, got -5"),
    ("train.max-grad-norm", 0.0, "train.max-grad-norm must be > 0, got 0.0"),
    ("train.optimizer", "adamw", "train.optimizer must be a transformers optimizer name"),
    ("train.padding-free", "yes", "train.padding-free must be true or false, got 'yes'"),
    ("train.packing", 1, "train.packing must be true or false, got 1"),
    ("train.save-every-round", -1, "train.save-every-round must be >= 0 (0 saves only the final adapter), got -1"),
    ("strategy.fraction-train", 0.0, "strategy.fraction-train must be in (0, 1], got 0.0"),
    ("strategy.fraction-evaluate", 1.5, "strategy.fraction-evaluate must be in [0, 1], got 1.5"),
    ("strategy.min-train-nodes", 0, "strategy.min-train-nodes must be >= 1, got 0"),
    ("strategy.round-timeout", 0, "strategy.round-timeout must be > 0 seconds, got 0.0"),
    ("evaluate.exact-match-examples", -1, "evaluate.exact-match-examples must be >= 0 (0 = no exact-match evaluation), got -1"),
    ("evaluate.max-new-tokens", 0, "evaluate.max-new-tokens must be >= 1"),
    ("evaluate.on-receipt", "yes", "evaluate.on-receipt must be true or false, got 'yes'"),
    ("evaluate.on-receipt", 1, "evaluate.on-receipt must be true or false, got 1"),
    ("results.dir", "", "results.dir must be a folder path"),
    ("results.run-name", "../elsewhere", "results.run-name must be empty"),
    ("results.tensorboard", "yes", "results.tensorboard must be true or false, got 'yes'"),
    ("results.wandb-project", "team/project", "results.wandb-project must be empty (no W&B) or a W&B project name"),
    ("results.wandb-project", "x" * 129, "at most 128 characters"),
]


def test_a_tracker_key_typo_gets_a_suggestion(run_config):
    run_config["results.tensorbord"] = True
    with pytest.raises(ConfigError, match=r"Did you mean 'results.tensorboard'\?"):
        parse_config(run_config)


@pytest.mark.parametrize(("key", "value", "message"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_gives_one_clear_message(run_config, key, value, message):
    run_config[key] = value
    with pytest.raises(ConfigError) as raised:
        parse_config(run_config)
    assert message in str(raised.value)
    assert key in str(raised.value)


def test_unknown_key_is_named_with_a_suggestion(run_config):
    run_config["model.quantisation"] = 8
    with pytest.raises(ConfigError, match=r"Unknown config key 'model.quantisation'. Did you mean 'model.quantization'\?"):
        parse_config(run_config)


def test_missing_key_is_named(run_config):
    del run_config["train.max-steps"]
    with pytest.raises(ConfigError, match=r"Missing config key 'train.max-steps'"):
        parse_config(run_config)


def test_all_problems_reported_in_one_message(run_config):
    run_config.update({"model.quantization": 3, "model.lora.r": 0})
    with pytest.raises(ConfigError) as raised:
        parse_config(run_config)
    text = str(raised.value)
    assert text.startswith("2 problems in the run config:")
    assert "model.quantization" in text and "model.lora.r" in text
