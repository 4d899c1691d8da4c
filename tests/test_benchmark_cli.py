"""The benchmark scripts refuse bad arguments before running anything, and build what they say."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO_ROOT


def _benchmark(name: str = "round_benchmark"):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "1"], "--rounds must be >= 2"),
    (["--run-config", "model.quantization=3"], "model.quantization must be 4 or 8"),
    (["--run-config", "train.nope=1"], "Key 'train.nope' is not present"),
    (["--compare", "speed"], "invalid choice: 'speed'"),
])
def test_bad_arguments_stop_with_one_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        _benchmark().main([*argv, "--output", str(tmp_path)])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_random_model_is_a_loadable_checkpoint_of_the_asked_shape(tmp_path, capsys):
    folder = tmp_path / "random"
    assert _benchmark("random_model").main([str(folder), "--hidden", "64", "--layers", "3",
                                            "--intermediate", "96", "--heads", "4"]) == 0
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 3)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert f"{count / 1e6:.0f}M parameters" in capsys.readouterr().out
    tokens = AutoTokenizer.from_pretrained(folder)("Give the opposite of hot.", return_tensors="pt")
    assert torch.isfinite(model(**tokens).logits).all()


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "100", "--heads", "16"], "--hidden (100) must be a multiple of --heads (16)"),
    (["--layers", "0"], "--layers must be a positive integer, got 0"),
])
def test_random_model_refuses_bad_shapes(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _benchmark("random_model").main([str(tmp_path / "random"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "random").exists()


def test_reference_comparison_reads_rounds_and_training_loops_from_timed_log_lines():
    lines = [
        (10.0, "INFO :      [ROUND 1/3]"),
        (11.0, "(ClientAppActor pid=7) {'train_runtime': 0.57, 'train_samples_per_second': 280.1, 'train_loss': 1.74}"),
        (14.5, "INFO :      [ROUND 2/3]"),
        (16.0, "(ClientAppActor pid=7) {'train_runtime': 0.61, 'train_samples_per_second': 262.3, 'train_loss': 1.5}"),
        (17.0, "INFO :      [ROUND 3/3]"),
        (20.25, "INFO :      Strategy execution finished in 10.31s"),
    ]
    log = _benchmark("reference_comparison").parse_log(lines)
    assert log.strategy_s == 10.31
    assert log.round_s == [4.5, 2.5, 3.25]
    assert log.train_runtime_s == [0.57, 0.61] and log.train_loss == [1.74, 1.5]


def test_reference_comparison_job_data_merges_input_into_the_instruction(tmp_path):
    source = tmp_path / "source.jsonl"
    source.write_text('{"instruction": "Add the two numbers.", "input": "9 + 8", "output": "17", "category": "add"}\n'
                      '{"instruction": "Name a colour.", "input": "", "output": "red"}\n')
    module = _benchmark("reference_comparison")
    assert module.write_job_data(tmp_path / "job.jsonl", source) == 2
    records = [json.loads(line) for line in (tmp_path / "job.jsonl").read_text().splitlines()]
    assert records == [{"instruction": "Add the two numbers.\n9 + 8", "output": "17"},
                       {"instruction": "Name a colour.", "output": "red"}]
    assert module.to_run_config_arg({"model.name": "/m", "train.max-steps": 10, "x": 1e-2, "b": True}) == (
        'model.name="/m" train.max-steps=10 x=0.01 b=true')
