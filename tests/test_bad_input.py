"""Bad input matrix: each invalid input stops the server at start-up with one clear message.

Every case runs the real ServerApp entry point. None may get as far as training (the Grid given is
None: touching it would fail differently), and none may leave a results folder behind or change
an earlier run's files.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import Context

from flowertune_llm import server_app
from flowertune_llm.client.data import DatasetSourceError
from flowertune_llm.client.model import ModelSourceError
from flowertune_llm.server.results import ResultsError
from flowertune_llm.server.resume import ResumeError
from flowertune_llm.shared.settings import ConfigError

from conftest import default_run_config

GOOD_RECORD = {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"}


def _jsonl(tmp: Path, records: list[dict], name: str = "data.jsonl") -> str:
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _write(tmp: Path, name: str, content: bytes) -> str:
    (tmp / name).write_bytes(content)
    return str(tmp / name)


def _pickle_model(tmp: Path) -> str:
    folder = tmp / "bin-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"weight": torch.zeros(1)}, folder / "pytorch_model.bin")
    return str(folder)


def _file_in_the_way(tmp: Path) -> str:
    (tmp / "a-file").write_text("not a folder")
    return str(tmp / "a-file" / "results")


# (id, overrides built from a scratch folder, expected error type, text the message must contain)
Case = tuple[str, Callable[[Path], dict], type[Exception], str]
CASES: list[Case] = [
    # Config values: wrong type, out of range, unknown.
    ("quantization-3", lambda t: {"model.quantization": 3}, ConfigError, "model.quantization must be 4 or 8"),
    ("rounds-0", lambda t: {"num-server-rounds": 0}, ConfigError, "num-server-rounds must be >= 1, got 0"),
    ("lr-min-above-max", lambda t: {"train.learning-rate-min": 1.0}, ConfigError, "train.learning-rate-min must be in [0, train.learning-rate-max=0.005]"),
    ("rank-as-text", lambda t: {"model.lora.r": "sixteen"}, ConfigError, "model.lora.r must be an integer, got 'sixteen'"),
    ("remote-code-as-text", lambda t: {"model.trust-remote-code": "yes"}, ConfigError, "model.trust-remote-code must be true or false"),
    ("optimizer-typo", lambda t: {"train.optimizer": "adamw_torh"}, ConfigError, "closest: adamw_torch"),
    ("transfer-int8", lambda t: {"transfer.dtype": "int8"}, ConfigError, "transfer.dtype must be one of float32, float16, bfloat16"),
    ("min-replies-above-sampled", lambda t: {"strategy.min-train-replies": 3}, ConfigError, "strategy.min-train-replies must be <= strategy.min-train-nodes=2"),
    ("unknown-key", lambda t: {"train.learnig-rate-max": 0.1}, ConfigError, "Did you mean 'train.learning-rate-max'?"),
    ("server-every-0", lambda t: {"evaluate.server-every": 0}, ConfigError, "evaluate.server-every must be >= 1"),
    # Dataset files.
    ("data-missing", lambda t: {"dataset.name": str(t / "nope.jsonl")}, DatasetSourceError, "dataset.name: no such file or folder"),
    ("data-empty", lambda t: {"dataset.name": _write(t, "empty.jsonl", b"")}, DatasetSourceError, "is empty"),
    ("data-blank-lines", lambda t: {"dataset.name": _write(t, "blank.jsonl", b"\n\n  \n")}, DatasetSourceError, "is empty"),
    ("data-bad-suffix", lambda t: {"dataset.name": _write(t, "data.txt", b"hello")}, DatasetSourceError, "local files must be one of"),
    ("data-not-json", lambda t: {"dataset.name": _write(t, "broken.jsonl", b'{"instruction": "x", \n')}, DatasetSourceError, "cannot read"),
    ("data-not-utf8", lambda t: {"dataset.name": _write(t, "latin1.jsonl", '{"instruction": "café", "output": "x"}\n'.encode("latin-1"))}, DatasetSourceError, "is not UTF-8 text: byte 0xe9 at line 1"),
    ("data-no-instruction", lambda t: {"dataset.name": _jsonl(t, [{"question": "q", "output": "a"}])}, DatasetSourceError, "'instruction'"),
    ("data-no-output", lambda t: {"dataset.name": _jsonl(t, [{"instruction": "q", "answer": "a"}])}, DatasetSourceError, "'output'"),
    ("data-csv-no-columns", lambda t: {"dataset.name": _write(t, "data.csv", b"text,label\nhello,1\n")}, DatasetSourceError, "'instruction'"),
    ("data-row-longer-than-seq-length", lambda t: {"dataset.name": _jsonl(t, [GOOD_RECORD, {"instruction": "word " * 2000, "output": "x"}])}, DatasetSourceError, "have a prompt of train.seq-length=256 tokens or more"),
    ("heldout-missing", lambda t: {"evaluate.server-dataset": str(t / "nope.csv")}, DatasetSourceError, "evaluate.server-dataset: no such file or folder"),
    ("heldout-empty", lambda t: {"evaluate.server-dataset": _write(t, "empty.csv", b"")}, DatasetSourceError, "evaluate.server-dataset: "),
    # Model sources.
    ("model-folder-without-config", lambda t: {"model.name": str(t)}, ModelSourceError, "is a local path but not a model folder"),
    ("model-is-a-file", lambda t: {"model.name": _write(t, "model.txt", b"x")}, ModelSourceError, "not a model folder"),
    ("model-pickle-only", lambda t: {"model.name": _pickle_model(t)}, ModelSourceError, "has no .safetensors weights"),
    # Results and resume.
    ("results-not-writable", lambda t: {"results.dir": _file_in_the_way(t)}, ResultsError, "is not a writable folder"),
    ("resume-missing", lambda t: {"train.resume-from": str(t / "no-run")}, ResumeError, "is not a folder"),
    ("resume-not-a-run", lambda t: {"train.resume-from": str(t)}, ResumeError, "is not a run folder"),
    # Trackers.
    ("wandb-project-with-slash", lambda t: {"results.wandb-project": "team/run"}, ConfigError, "results.wandb-project must be empty (no W&B) or a W&B project name"),
]


@pytest.mark.parametrize("make_overrides, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_stops_the_run_before_training_with_one_clear_message(tmp_path, make_overrides, error, message):
    scratch = tmp_path / "inputs"
    scratch.mkdir()
    overrides = {"results.dir": str(tmp_path / "results"), **make_overrides(scratch)}
    run_config = {**default_run_config(), **overrides}  # bypass flwr's own unknown-key check
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(error) as raised:
        server_app.main(None, Context(run_id=1, node_id=0, node_config={}, state=None, run_config=run_config))
    assert message in str(raised.value)
    assert "\n" not in str(raised.value) or str(raised.value).startswith(("1 problem", "2 problems"))
    # Nothing was created, nothing changed.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_existing_run_is_never_overwritten(tmp_path):
    run = tmp_path / "results" / "run"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text('{"rounds": [1]}')
    run_config = default_run_config(**{"results.dir": str(tmp_path / "results"), "results.run-name": "run"})
    with pytest.raises(ResultsError, match="already holds a run"):
        server_app.main(None, Context(run_id=1, node_id=0, node_config={}, state=None, run_config=run_config))
    assert [p.name for p in run.iterdir()] == ["metrics.json"] and (run / "metrics.json").read_text() == '{"rounds": [1]}'



@pytest.mark.parametrize("key", ["train.padding-free", "train.packing"])
def test_a_model_that_would_mix_flattened_examples_stops_the_run_before_any_folder(tmp_path, monkeypatch, key):
    # As a model whose attention is not one that keeps a flattened row's examples apart (remote
    # code, flex attention): here the built-in model's sdpa is taken off the accepted list.
    from flowertune_llm.client import training

    monkeypatch.setattr(training, "FLATTENED_ATTENTION", ("eager",))
    run_config = default_run_config(**{"results.dir": str(tmp_path / "results"), "train.padding-free": False, key: True})
    with pytest.raises(training.FlattenedAttentionError) as refused:
        server_app.main(None, Context(run_id=1, node_id=0, node_config={}, state=None, run_config=run_config))
    assert f"{key} = true" in str(refused.value) and "'sdpa'" in str(refused.value)
    assert f"Set {key} = false" in str(refused.value)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("key, value, package", [
    ("results.tensorboard", True, "tensorboard"),
    ("results.wandb-project", "my-project", "wandb"),
])
def test_a_tracker_without_its_package_stops_the_run_with_what_to_install(tmp_path, monkeypatch, key, value, package):
    monkeypatch.setitem(sys.modules, package, None)  # what importlib finds when a package is not installed
    run_config = default_run_config(**{"results.dir": str(tmp_path / "results"), key: value})
    with pytest.raises(ConfigError) as raised:
        server_app.main(None, Context(run_id=1, node_id=0, node_config={}, state=None, run_config=run_config))
    shown = "true" if value is True else repr(value)
    assert str(raised.value) == (
        f"{key}={shown} needs the '{package}' package, which is not installed where the server runs: "
        f"pip install 'flowertune-llm[tracking]' (or pip install {package}), or turn {key} off"
    )
    assert not (tmp_path / "results").exists()
