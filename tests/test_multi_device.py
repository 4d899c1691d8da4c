"""Several devices per client (client/multi_device.py): bad values refused at once, 2 CPU processes (gloo)
train the adapter one process would with the same global batch, a failing worker fails the round cleanly.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from flowertune_llm.shared.settings import ConfigError, for_node, parse_config, parse_node_config

from conftest import REPO_ROOT, default_run_config


@pytest.mark.parametrize("value", [0, -1, "two", 3])
def test_a_bad_train_num_devices_is_one_config_error_naming_key_value_and_accepted(value):
    with pytest.raises(ConfigError) as error:
        parse_config(default_run_config(**{"train.num-devices": value, "train.batch-size": 4}))
    message = str(error.value)
    assert "train.num-devices" in message and repr(value) in message and "problems" not in message
    if not isinstance(value, str):
        assert "one of 1, 2, 4" in message


@pytest.mark.parametrize("value", [0, -1, "two", True])
def test_a_bad_node_num_devices_is_refused_with_the_key_and_value(value):
    with pytest.raises(ConfigError, match=r"node config: num-devices must be an integer >= 1.*got " + repr(value)):
        parse_node_config({"partition-id": 0, "num-partitions": 2, "num-devices": value})


def test_a_node_num_devices_overrides_the_run_and_must_divide_the_batch(config):
    node = parse_node_config({"data-path": "/d.jsonl", "num-devices": 2})
    assert for_node(config, node).train.num_devices == 2 and config.train.num_devices == 1
    assert for_node(config, parse_node_config({"data-path": "/d.jsonl"})).train.num_devices == 1
    with pytest.raises(ConfigError, match=r"node config: num-devices must be an integer that divides "
                                          r"train.batch-size=16 .* one of 1, 2, 4, 8, 16; got 3"):
        for_node(config, parse_node_config({"data-path": "/d.jsonl", "num-devices": 3}))


def test_the_client_refuses_a_bad_node_num_devices_before_loading_anything(monkeypatch, server_app_identity):
    from flwr.app import Context, Message, RecordDict

    from flowertune_llm import client_app
    from flowertune_llm.client import data
    from flowertune_llm.shared import devices

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the settings were checked")

    # The handler imports what it runs when it runs (client_app.py), from these modules.
    monkeypatch.setattr(data, "load_client_data", no_work)
    monkeypatch.setattr(devices, "prepare_client_device", no_work)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2, "num-devices": 5},
                      state=RecordDict(), run_config=default_run_config())
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    with pytest.raises(ConfigError, match="node config: num-devices .* got 5"):
        client_app.train(msg, context)


def test_the_chunked_loss_is_refused_with_several_devices():
    with pytest.raises(ConfigError, match="train.loss-chunk-tokens must be 0 with train.num-devices=2"):
        parse_config(default_run_config(**{"train.num-devices": 2, "train.loss-chunk-tokens": 256}))


def _fake_gpus(monkeypatch, count: int) -> None:
    """Make torch.cuda report `count` H100s."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))


def test_a_client_needs_a_gpu_per_device_and_may_see_several(monkeypatch):
    from flowertune_llm.client.multi_device import MultiDeviceError, check_devices
    from flowertune_llm.shared.devices import DeviceError, prepare_client_device

    _fake_gpus(monkeypatch, 1)
    with pytest.raises(MultiDeviceError, match=r"num-devices\) = 2, but this client sees 1 GPU"):
        check_devices(2)
    _fake_gpus(monkeypatch, 2)
    check_devices(2)
    assert prepare_client_device("off", num_devices=2).on_gpu
    with pytest.raises(DeviceError, match="sees 2 GPUs"):
        prepare_client_device("off")


def test_training_on_several_devices_outside_their_worker_processes_is_refused(config, monkeypatch):
    from flowertune_llm.client.training import train_adapter

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    settings = dataclasses.replace(config.train, num_devices=2)
    with pytest.raises(RuntimeError, match="train.num-devices=2 but this process is one of 1"):
        train_adapter(None, None, None, settings, learning_rate=1e-2, seed=1)


# --- Two worker processes on the CPU (gloo) ------------------------------------------------------


def _setup(**overrides):
    """Return the settings (2 devices, global batch 4), one partition and a received adapter."""
    from flowertune_llm.client.data import load_client_data
    from flowertune_llm.client.model import build_adapter_skeleton
    from flowertune_llm.shared.adapters import adapter_state

    # No LoRA dropout: each process draws its own masks for its half of a batch (docs/multi-device.md).
    config = parse_config(default_run_config(**{
        "train.num-devices": 2, "train.batch-size": 4, "train.max-steps": 2, "train.seq-length": 128,
        "model.lora.dropout": 0.0, **overrides,
    }))
    data, _ = load_client_data(config.dataset, 0, 2)
    return config, data, adapter_state(build_adapter_skeleton(config.model, seed=7))


def _no_children_left() -> list[psutil.Process]:
    return [child for child in psutil.Process().children(recursive=True) if child.is_running()
            and child.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.integration
@pytest.mark.parametrize("learning_rate", [5e-5, 1e-2])
def test_two_cpu_processes_train_the_adapter_one_process_trains_with_the_same_global_batch(learning_rate):
    from flowertune_llm.client.model import build_peft_model, load_tokenizer
    from flowertune_llm.client.multi_device import RoundJob, train_on_devices
    from flowertune_llm.client.training import train_adapter
    from flowertune_llm.shared.adapters import adapter_state, load_adapter_state

    config, data, received = _setup()
    two, outcome_two = train_on_devices(config, data, received, RoundJob(learning_rate, seed=1234), timeout_s=600)
    model = build_peft_model(config.model)
    load_adapter_state(model, received)
    one_device = dataclasses.replace(config.train, num_devices=1)
    outcome_one = train_adapter(model, load_tokenizer(config.model), data, one_device, learning_rate, 1234)
    one = adapter_state(model)

    # The same examples per step: the same tokens counted; the loss within bf16's rounding (2^-8).
    assert outcome_two.tokens == outcome_one.tokens
    assert outcome_two.loss == pytest.approx(outcome_one.loss, rel=2**-7)
    assert set(two) == set(one) and all(t.dtype == torch.float32 for t in two.values())
    update_one = torch.cat([(one[k] - received[k]).flatten() for k in one])
    update_two = torch.cat([(two[k] - received[k]).flatten() for k in one])
    # Both moved every entry; the updates differ by the bf16 rounding of the compute (padding to each
    # process's longest example, the all-reduce's order) that AdamW's sign-like first steps amplify
    # where a gradient is near zero. Measured (2 CPU cores, 2026-12-06): see docs/multi-device.md.
    difference = ((update_two - update_one).norm() / update_one.norm()).item()
    assert difference < 0.1, difference
    assert torch.nn.functional.cosine_similarity(update_one, update_two, dim=0) > 0.99
    assert not _no_children_left()


@pytest.mark.integration
def test_a_failing_worker_fails_the_round_with_its_error_and_leaves_no_process():
    from flowertune_llm.client.multi_device import MultiDeviceError, RoundJob, train_on_devices

    config, data, received = _setup()
    # An adapter that does not fit the model: every worker raises while loading it. Whichever raises
    # first, torchrun stops the other, which may then leave no traceback: either rank's is the error.
    received["not-a-lora-weight"] = torch.zeros(2)
    with pytest.raises(MultiDeviceError, match=r"(?s)worker [01] of 2 failed:.*Traceback.*not-a-lora-weight"):
        train_on_devices(config, data, received, RoundJob(1e-2, seed=1), timeout_s=600)
    assert not _no_children_left()


@pytest.mark.integration
def test_workers_past_the_round_timeout_are_killed_and_the_round_fails():
    from flowertune_llm.client.multi_device import MultiDeviceError, RoundJob, train_on_devices

    config, data, received = _setup()
    with pytest.raises(MultiDeviceError, match=r"strategy.round-timeout=3 s"):
        train_on_devices(config, data, received, RoundJob(1e-2, seed=1), timeout_s=3)
    assert not _no_children_left()


def _workers(rank: str | None = None) -> list[psutil.Process]:
    """Return this test's worker processes of multi_device launches (rank `rank` only, if given), torchrun excluded.

    Only this process's descendants: another test run on the machine has workers of its own.
    """
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            command = " ".join(process.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "flowertune_llm.client.multi_device" not in command or "torch.distributed.run" in command:
            continue
        try:
            if rank is None or process.environ().get("RANK") == rank:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _kill_when_started(rank: str, stop: threading.Event) -> None:
    """SIGKILL the worker of rank `rank` as soon as it runs."""
    while not stop.is_set():
        for worker in _workers(rank):
            worker.kill()
            return
        time.sleep(0.2)


@pytest.mark.integration
def test_a_killed_worker_fails_the_round_with_the_signal_and_leaves_no_process():
    from flowertune_llm.client.multi_device import MultiDeviceError, RoundJob, train_on_devices

    # Many steps: the worker is still training whenever the killer finds it.
    config, data, received = _setup(**{"train.max-steps": 1000})
    stop = threading.Event()
    killer = threading.Thread(target=_kill_when_started, args=("1", stop), daemon=True)
    killer.start()
    try:
        with pytest.raises(MultiDeviceError, match=r"(?s)torchrun exited with code 1.*SIGKILL"):
            train_on_devices(config, data, received, RoundJob(1e-2, seed=1), timeout_s=600)
    finally:
        stop.set()
        killer.join()
    assert not _no_children_left()


@pytest.mark.integration
def test_workers_stop_when_the_client_process_is_killed(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(
        "from test_multi_device import _setup\n"
        "from flowertune_llm.client.multi_device import RoundJob, train_on_devices\n"
        "config, data, received = _setup(**{'train.max-steps': 1000})\n"
        "train_on_devices(config, data, received, RoundJob(1e-2, seed=1), timeout_s=600)\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    client = subprocess.Popen([sys.executable, str(script)], env=environment, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len(_workers()) < 2 and time.monotonic() < deadline and client.poll() is None:
            time.sleep(0.5)
        # Kept by PID: once the client is gone, a surviving worker is no longer a descendant of this test.
        started = _workers()
        assert len(started) == 2, "the workers did not start"
    finally:
        client.kill()
        client.wait()

    def alive() -> list[psutil.Process]:
        return [w for w in started if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]

    deadline = time.monotonic() + 60
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = alive()
    for worker in left:
        worker.kill()
    assert not left


@pytest.mark.integration
def test_a_simulated_client_trains_on_two_processes_and_replies_as_one(tmp_path):
    import json

    from flowertune_llm.tools.simulation import simulate

    # One node, one round: the ClientApp runs in a Ray actor and starts its 2 workers, then evaluates
    # the new global adapter in its own process (one process: no process group there).
    simulate(default_run_config(**{
        "num-server-rounds": 1, "train.num-devices": 2, "train.batch-size": 4, "train.max-steps": 2,
        "evaluate.exact-match-examples": 4, "strategy.min-available-nodes": 1, "strategy.min-train-nodes": 1,
        "strategy.min-evaluate-nodes": 1, "train.save-every-round": 0,
        "results.dir": str(tmp_path), "results.run-name": "run",
    }), num_supernodes=1)
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert [(r["train_replies"], r["train_failures"]) for r in rounds] == [(1, 0)]
    assert [(r["eval_replies"], r["eval_failures"]) for r in rounds] == [(1, 0)]
    assert rounds[0]["train_loss"] > 0 and rounds[0]["eval_loss"] > 0 and rounds[0]["device"] == "cpu"
    # Rank 0's whole outcome comes back, the training loop's own time included.
    assert 0 < rounds[0]["time_train_loop_s"] <= rounds[0]["time_train_s"]
    assert not _workers()
