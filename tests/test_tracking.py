"""Trackers: TensorBoard event files and W&B offline runs hold exactly metrics.json's per-round numbers."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowertune_llm.client.model import build_adapter_skeleton
from flowertune_llm.server.results import RunRecorder
from flowertune_llm.server.tracking import WANDB_RUN, numeric_fields
from flowertune_llm.shared.adapters import adapter_state, to_array_record
from flowertune_llm.shared.settings import parse_config
from flowertune_llm.tools.simulation import simulate

from conftest import REPO_ROOT, default_run_config

# The tracking extra (also in the test extra): without it these tests are skipped, not broken.
EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator
PROJECT = "flowertune-test"


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Return every scalar tag in the folder's event files as (step, value) pairs, as TensorBoard shows them."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Return metrics.json's numeric fields per key as (round, value) pairs."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in numeric_fields(record).items():
            expected.setdefault(key, []).append((record["round"], value))
    return expected


def _assert_same(logged: dict, expected: dict, rel: float) -> None:
    assert logged.keys() == expected.keys()
    for key, points in expected.items():
        assert [step for step, _ in logged[key]] == [step for step, _ in points], key
        # TensorBoard stores scalars as float32: about 7 significant digits.
        assert [v for _, v in logged[key]] == pytest.approx([v for _, v in points], rel=rel, abs=1e-6), key


def _wandb_records(path: Path):
    """Yield the protobuf records of a W&B `.wandb` file (LevelDB's log format behind a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        position += 7
        if position + length > len(data):  # a record still being written
            return
        pending += data[position:position + length]
        position += length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_history(run_file: Path) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """Return a W&B offline run's id and its logged numbers per key as (step, value) pairs."""
    # W&B's service process writes the file and may still be flushing it when `finish()` has
    # returned (seen here: a file read at once held no records yet): wait for its exit record.
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(run_file)):
        assert time.monotonic() < deadline, f"{run_file} has no exit record"
        time.sleep(0.2)
    run_id, history = "", {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            step = items.pop("_step")
            for key, value in items.items():
                if not key.startswith("_"):  # W&B's own _runtime, _timestamp
                    history.setdefault(key, []).append((step, value))
    return run_id, history


def _wandb_run_files(wandb_dir: Path) -> list[Path]:
    return sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path) -> Path:
    """W&B in offline mode, its files in a scratch folder; return that folder."""
    pytest.importorskip("wandb")
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return folder


@pytest.mark.integration
def test_a_real_run_logs_every_round_of_metrics_json_to_tensorboard_and_wandb(tmp_path, wandb_offline):
    simulate(default_run_config(**{
        "num-server-rounds": 2, "train.max-steps": 3, "evaluate.exact-match-examples": 8,
        "results.dir": str(tmp_path), "results.run-name": "tracked",
        "results.tensorboard": True, "results.wandb-project": PROJECT,
    }))
    folder = tmp_path / "tracked"
    records = json.loads((folder / "metrics.json").read_text())["rounds"]
    expected = _expected(records)
    assert [r["round"] for r in records] == [1, 2]
    # The figures a reader looks for first, and a per-task one, are among them.
    assert {"train_loss", "eval_loss", "learning_rate", "bytes_total"} <= expected.keys()
    assert any(key.startswith("eval_exact_match_per_task/") for key in expected)

    assert list(folder.glob("events.out.tfevents.*"))
    _assert_same(_scalars(folder), expected, rel=1e-6)

    run_files = _wandb_run_files(wandb_offline)
    assert len(run_files) == 1
    run_id, history = _wandb_history(run_files[0])
    assert json.loads((folder / WANDB_RUN).read_text()) == {"project": PROJECT, "id": run_id}
    _assert_same(history, expected, rel=1e-12)


def _recorder(folder: Path, earlier: list[dict] | None = None, **overrides) -> RunRecorder:
    config = parse_config(default_run_config(**{
        "num-server-rounds": 3, "results.dir": str(folder.parent), "results.run-name": folder.name, **overrides,
    }))
    return RunRecorder(folder, config, build_adapter_skeleton(config.model, seed=0), earlier_rounds=earlier)


def _rounds(folder: Path, last: int) -> list[dict]:
    return [r for r in json.loads((folder / "metrics.json").read_text())["rounds"] if r["round"] <= last]


def test_a_resumed_run_continues_the_event_log_without_the_round_it_trains_again(tmp_path):
    folder = tmp_path / "run"
    first = _recorder(folder, **{"results.tensorboard": True})
    arrays = to_array_record(adapter_state(first.skeleton))
    for server_round in (1, 2):
        first.end_round(server_round, arrays, {"train_loss": 1.0 / server_round})
    # Killed after round 3 was logged but before its checkpoint: the resume trains round 3 again.
    first.trackers[0].log_round({"round": 3, "train_loss": 99.0})

    resumed = _recorder(folder, _rounds(folder, 2), **{"results.tensorboard": True})
    resumed.end_round(3, arrays, {"train_loss": 1.0 / 3})
    resumed.finish(arrays)

    records = json.loads((folder / "metrics.json").read_text())["rounds"]
    assert _scalars(folder)["train_loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1.0 / 3))]
    _assert_same(_scalars(folder), _expected(records), rel=1e-6)


def test_tensorboard_switched_on_at_a_resume_is_given_the_earlier_rounds(tmp_path):
    folder = tmp_path / "run"
    first = _recorder(folder)
    arrays = to_array_record(adapter_state(first.skeleton))
    for server_round in (1, 2):
        first.end_round(server_round, arrays, {"train_loss": 1.0 / server_round})
    assert not list(folder.glob("events.out.tfevents.*"))

    resumed = _recorder(folder, _rounds(folder, 2), **{"results.tensorboard": True})
    resumed.end_round(3, arrays, {"train_loss": 1.0 / 3})
    resumed.finish(arrays)
    _assert_same(_scalars(folder), _expected(json.loads((folder / "metrics.json").read_text())["rounds"]), rel=1e-6)


def test_a_resumed_run_goes_on_in_the_same_wandb_run(tmp_path, wandb_offline):
    folder = tmp_path / "run"
    first = _recorder(folder, **{"results.wandb-project": PROJECT})
    arrays = to_array_record(adapter_state(first.skeleton))
    for server_round in (1, 2):
        first.end_round(server_round, arrays, {"train_loss": 1.0 / server_round})
    first.trackers[0].close()  # what W&B's exit hook does when the process dies

    resumed = _recorder(folder, _rounds(folder, 2), **{"results.wandb-project": PROJECT})
    resumed.end_round(3, arrays, {"train_loss": 1.0 / 3})
    resumed.finish(arrays)

    (first_id, before), (second_id, after) = (_wandb_history(f) for f in _wandb_run_files(wandb_offline))
    assert first_id == second_id == json.loads((folder / WANDB_RUN).read_text())["id"]
    assert before["train_loss"] == [(1, 1.0), (2, 0.5)] and after["train_loss"] == [(3, pytest.approx(1.0 / 3))]


def test_a_run_without_trackers_imports_neither_package():
    code = (
        "import sys; from flwr.common.config import get_fused_config_from_dir; "
        "from flowertune_llm.shared.settings import parse_config; from flowertune_llm.server.results import RunRecorder; "
        "from flowertune_llm.server.tracking import check_trackers, open_trackers; "
        f"config = parse_config(get_fused_config_from_dir({str(REPO_ROOT)!r}, {{}})); "
        "check_trackers(config.results); assert open_trackers(None, config) == []; "
        "print(sorted(m for m in ('tensorboard', 'wandb', 'torch.utils.tensorboard') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
