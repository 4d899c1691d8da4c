"""Resume: a run killed mid-way and continued from its folder ends where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Context
from safetensors.torch import load_file

from flowertune_llm import server_app
from flowertune_llm.client.model import build_adapter_skeleton
from flowertune_llm.server.results import CHECKPOINT, RunRecorder
from flowertune_llm.server.resume import ResumeError, find_resume_point
from flowertune_llm.shared.adapters import adapter_state, to_array_record
from flowertune_llm.shared.settings import parse_config
from flowertune_llm.tools.simulation import simulate

from conftest import REPO_ROOT, default_run_config

ROUNDS = 3
# Resumed and uninterrupted runs compute the same thing, usually bit for bit. But CPU bf16 kernels
# are not always reproducible across processes: two fresh runs on a loaded machine once differed by
# 3e-5 (relative) in round 1's loss. One round of 3 steps with another round seed (what a resume
# that restarted the seeds would do) moves the adapter by up to 3.3e-2, so 1e-3 tells them apart.
TOLERANCE = 1e-3


def _run_config(results: Path, name: str, **overrides) -> dict:
    return default_run_config(**{
        "num-server-rounds": ROUNDS, "train.max-steps": 3, "train.save-every-round": 0,
        "results.dir": str(results), "results.run-name": name, **overrides,
    })


def _rounds(folder: Path) -> list[dict]:
    metrics = folder / "metrics.json"
    return json.loads(metrics.read_text())["rounds"] if metrics.exists() else []


def _kill_after_first_round(run_config: dict, folder: Path, tmp_path: Path) -> None:
    """Run the app in its own process group and SIGKILL the whole group once round 1 is checkpointed.

    A round's metrics are written before its checkpoint, so waiting for metrics.json alone can kill
    the run between the two, with nothing to resume from.
    """
    config_file = tmp_path / f"{folder.name}.json"
    config_file.write_text(json.dumps(run_config))
    with open(tmp_path / f"{folder.name}.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "flowertune_llm.tools.simulation", str(config_file)],
            cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not (folder / CHECKPOINT).exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and its Ray workers: no clean shutdown
        process.wait()
    assert 1 <= len(_rounds(folder)) < ROUNDS, (tmp_path / f"{folder.name}.log").read_text()[-3000:]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter_as_an_uninterrupted_run(tmp_path):
    simulate(_run_config(tmp_path, "whole"))

    cut = tmp_path / "cut"
    _kill_after_first_round(_run_config(tmp_path, "cut"), cut, tmp_path)
    assert not (cut / "adapter-final").exists()
    killed_at = len(_rounds(cut))
    resume_config = _run_config(tmp_path, "cut", **{"train.resume-from": str(cut)})
    checkpoint_round = find_resume_point(parse_config(resume_config)).round
    assert 1 <= checkpoint_round <= killed_at

    simulate(resume_config)

    whole, resumed = json.loads((tmp_path / "whole" / "metrics.json").read_text()), json.loads((cut / "metrics.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, ROUNDS + 1))
    assert resumed["resumed-after-round"] == [checkpoint_round]
    # The learning-rate schedule went on where it was.
    assert [r["learning_rate"] for r in resumed["rounds"]] == [r["learning_rate"] for r in whole["rounds"]]
    for mine, reference in zip(resumed["rounds"], whole["rounds"]):
        assert mine["train_loss"] == pytest.approx(reference["train_loss"], rel=TOLERANCE)

    final = load_file(cut / "adapter-final" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "whole" / "adapter-final" / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    worst = max((final[k].float() - expected[k].float()).abs().max().item() for k in final)
    assert worst <= TOLERANCE, f"largest difference {worst:.3g}"


def _finished_run(tmp_path: Path) -> Path:
    """A run folder as a 2-round run leaves it, without training (checkpoint + records written by hand)."""
    run_config = _run_config(tmp_path, "done", **{"num-server-rounds": 2})
    config = parse_config(run_config)
    skeleton = build_adapter_skeleton(config.model, seed=0)
    recorder = RunRecorder(tmp_path / "done", config, skeleton)
    arrays = to_array_record(adapter_state(skeleton))
    for server_round in (1, 2):
        recorder.end_round(server_round, arrays, {"train_loss": 1.0 / server_round})
    return tmp_path / "done"


def test_resume_drops_records_after_the_checkpoint_round(tmp_path):
    folder = _finished_run(tmp_path)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["rounds"].append({"round": 3, "train_loss": 0.1})  # died after metrics, before checkpoint
    (folder / "metrics.json").write_text(json.dumps(metrics))
    point = find_resume_point(parse_config(_run_config(tmp_path, "done", **{
        "num-server-rounds": 2, "train.resume-from": str(folder)})))
    assert point.round == 2 and [r["round"] for r in point.rounds] == [1, 2]


def test_resuming_a_finished_run_only_writes_its_final_adapter(tmp_path):
    folder = _finished_run(tmp_path)
    before = (folder / "metrics.json").read_text()
    run_config = _run_config(tmp_path, "done", **{"num-server-rounds": 2, "train.resume-from": str(folder)})
    server_app.main(None, Context(run_id=1, node_id=0, node_config={}, state=None, run_config=run_config))
    assert (folder / "adapter-final" / "adapter_model.safetensors").is_file()
    after = json.loads((folder / "metrics.json").read_text())
    assert after["rounds"] == json.loads(before)["rounds"] and after["resumed-after-round"] == [2]


@pytest.mark.parametrize("change, message", [
    ({"train.resume-from": "no/such/run"}, "train.resume-from: 'no/such/run' is not a folder"),
    ({"model.lora.r": 8}, "was started with other settings.* model.lora.r=16 \\(now 8\\)"),
    ({"train.seq-length": 128}, "train.seq-length=256 \\(now 128\\)"),
])
def test_resume_refuses_what_it_cannot_continue(tmp_path, change, message):
    folder = _finished_run(tmp_path)
    snapshot = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    settings = {"num-server-rounds": 2, "train.resume-from": str(folder), **change}
    with pytest.raises(ResumeError, match=message):
        find_resume_point(parse_config(_run_config(tmp_path, "done", **settings)))
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == snapshot


def test_resume_of_a_run_that_finished_no_round_says_so(tmp_path):
    folder = _finished_run(tmp_path)
    (folder / "checkpoint.safetensors").unlink()
    with pytest.raises(ResumeError, match="stopped before its first round finished"):
        find_resume_point(parse_config(_run_config(tmp_path, "done", **{
            "num-server-rounds": 2, "train.resume-from": str(folder)})))
    shutil.rmtree(folder)
