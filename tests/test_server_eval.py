"""Server-side evaluation runs in a child process that sees only `evaluate.server-device`."""

from __future__ import annotations

import math

import pytest

from flowertune_llm.builtin.world import BUILTIN_DATASET_FILE
from flowertune_llm.client.model import build_adapter_skeleton
from flowertune_llm.server import evaluator as server_eval
from flowertune_llm.shared.adapters import adapter_state, to_array_record
from flowertune_llm.shared.devices import DeviceError
from flowertune_llm.shared.settings import ConfigError, parse_config

from conftest import default_run_config


@pytest.mark.parametrize(("device", "gpus", "visible"), [
    ("cpu", ["0", "1"], ""), ("cuda", ["3"], "3"), ("cuda:1", ["0", "5"], "5"),
])
def test_the_evaluating_child_sees_the_configured_device_only(device, gpus, visible):
    assert server_eval.evaluation_gpu(device, gpus) == visible


def test_a_gpu_the_server_does_not_see_is_refused_by_name():
    with pytest.raises(DeviceError, match=r"evaluate.server-device='cuda:2': the server sees 1 GPU"):
        server_eval.evaluation_gpu("cuda:2", ["0"])
    with pytest.raises(ConfigError, match=r"evaluate.server-device must be 'cpu', 'cuda' or 'cuda:N'.*got 'gpu0'"):
        parse_config(default_run_config(**{"evaluate.server-device": "gpu0"}))


@pytest.mark.slow  # the app's evaluator, in a subprocess
def test_the_child_evaluates_what_this_process_would_and_the_server_builds_no_model(monkeypatch, tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(BUILTIN_DATASET_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:8]))
    config = parse_config(default_run_config(**{
        "evaluate.server-dataset": str(heldout), "evaluate.exact-match-examples": 4,
        "evaluate.max-new-tokens": 4, "train.batch-size": 4,
    }))
    adapter = adapter_state(build_adapter_skeleton(config.model, seed=3))
    expected = server_eval.evaluate_in_this_process(config, adapter)

    def no_model_here(*args, **kwargs):
        raise AssertionError("the server process built an evaluation model")

    monkeypatch.setattr(server_eval, "inference_model", no_model_here)
    figures = server_eval.ServerEvaluator(config).evaluate(to_array_record(adapter, "float32"))
    assert math.isfinite(figures["server_eval_loss"]) and "server_exact_match" in figures
    assert figures["server_eval_loss"] == pytest.approx(expected.pop("server_eval_loss"), rel=1e-6)
    assert {key: figures[key] for key in expected} == expected  # greedy answers: the same counts
