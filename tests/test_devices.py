"""Device decisions on CPU: each GPU case is a fake `torch.cuda`, and each pin a real child process."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

from flowertune_llm.shared import devices
from flowertune_llm.shared.devices import DeviceError, TrainingDevice
from flowertune_llm.shared.settings import ConfigError, parse_config

from conftest import default_run_config

CPU = TrainingDevice("cpu", "cpu")
H200 = TrainingDevice("cuda", "NVIDIA H200", (9, 0))
T4 = TrainingDevice("cuda", "Tesla T4", (7, 5))


def fake_gpus(monkeypatch, count: int = 1, name: str = "Tesla T4", capability: tuple[int, int] = (7, 5)) -> None:
    """Make torch.cuda report `count` GPUs of one kind to the code under test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)


@pytest.fixture(autouse=True)
def fresh_process_caches():
    """Each test starts as a new process would: no cap set, no fused-loss probe done."""
    devices.cap_memory_to_ray_share.cache_clear()
    devices.fused_loss_problem.cache_clear()
    yield
    devices.cap_memory_to_ray_share.cache_clear()
    devices.fused_loss_problem.cache_clear()


def test_the_device_is_the_cpu_without_cuda_and_the_first_gpu_with_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.training_device() == CPU
    fake_gpus(monkeypatch, name="NVIDIA H200", capability=(9, 0))
    device = devices.training_device()
    assert device == H200 and device.on_gpu
    assert device.describe() == "cuda:0 (NVIDIA H200, compute capability 9.0)"


@pytest.mark.parametrize(("listed", "expected"), [("1,3", ["1", "3"]), ("", []), (" 2 ", ["2"])])
def test_visible_gpus_follow_cuda_visible_devices(listed, expected):
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": listed}) == expected


def test_visible_gpus_without_the_variable_are_every_gpu_torch_counts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.visible_gpus({}) == ["0", "1"]


def test_processes_get_one_gpu_each_round_robin_or_none_on_a_cpu_machine():
    assert devices.gpus_for_processes(5, ["0", "1"]) == ["0", "1", "0", "1", "0"]
    assert devices.gpus_for_processes(2, []) == [None, None]


def test_a_child_process_sees_only_the_gpu_it_was_given():
    environment = devices.one_gpu_environment({**os.environ, "CUDA_VISIBLE_DEVICES": "0,1"}, "1")
    probe = "import json, os, torch; print(json.dumps([os.environ['CUDA_VISIBLE_DEVICES'], torch.cuda.device_count()]))"
    listed, count = json.loads(subprocess.run([sys.executable, "-c", probe], env=environment, check=True,
                                              capture_output=True, text=True).stdout)
    assert listed == "1" and count <= 1  # 1 on a machine with GPUs, 0 on a CPU one
    assert devices.one_gpu_environment({"A": "b"}, None) == {"A": "b"}


def test_several_visible_gpus_stop_before_a_model_is_built(monkeypatch):
    fake_gpus(monkeypatch, count=2, capability=(9, 0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(DeviceError, match=r"sees 2 GPUs \(CUDA_VISIBLE_DEVICES='0,1'\).*CUDA_VISIBLE_DEVICES=0 flower-supernode"):
        devices.check_one_gpu()
    fake_gpus(monkeypatch, count=1, capability=(9, 0))
    devices.check_one_gpu()


def test_a_gpu_without_native_bf16_stops_with_its_name_and_capability():
    with pytest.raises(DeviceError, match=r"Tesla T4 \(compute capability 7.5\) has no native bfloat16"):
        devices.check_bf16(T4)
    devices.check_bf16(H200)
    devices.check_bf16(CPU)


def test_expect_gpu_stop_refuses_a_cpu_client_and_warn_does_not():
    with pytest.raises(DeviceError, match=r"train.expect-gpu='stop': this client sees no CUDA GPU"):
        devices.check_expected_gpu(CPU, "stop")
    devices.check_expected_gpu(CPU, "warn")
    devices.check_expected_gpu(H200, "stop")


def test_a_cpu_client_with_expect_gpu_stop_fails_before_any_model_is_built(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="train.expect-gpu='stop'"):
        devices.prepare_client_device("stop")
    assert devices.prepare_client_device("off") == CPU


def test_expect_gpu_takes_only_its_three_values():
    assert parse_config(default_run_config(**{"train.expect-gpu": "warn"})).train.expect_gpu == "warn"
    with pytest.raises(ConfigError, match=r"train.expect-gpu must be one of off, warn, stop.*got 'yes'"):
        parse_config(default_run_config(**{"train.expect-gpu": "yes"}))


def fake_ray(monkeypatch, resources: dict[str, float]) -> None:
    """Stand in a Ray actor's runtime context that reports `resources` as assigned."""
    context = types.SimpleNamespace(get_assigned_resources=lambda: resources)
    module = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", module)


def test_an_actor_with_half_a_gpu_caps_its_allocator_at_half_once(monkeypatch):
    fake_gpus(monkeypatch, capability=(9, 0))
    fake_ray(monkeypatch, {"CPU": 1.0, "GPU": 0.5})
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share, device: calls.append((share, device)))
    assert devices.cap_memory_to_ray_share() == 0.5
    assert devices.cap_memory_to_ray_share() == 0.5
    assert calls == [(0.5, 0)]


@pytest.mark.parametrize("resources", [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}])
def test_a_whole_gpu_or_none_sets_no_cap(monkeypatch, resources):
    fake_gpus(monkeypatch, capability=(9, 0))
    fake_ray(monkeypatch, resources)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda *_: pytest.fail("no cap expected"))
    assert devices.cap_memory_to_ray_share() is None


def test_outside_ray_there_is_no_share(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert devices.ray_gpu_share() is None


@pytest.mark.integration  # starts a Ray cluster, as a simulation does
def test_ray_gives_actors_the_gpu_share_they_asked_for():
    # A real Ray cluster declaring one GPU (none is needed for Ray's bookkeeping), in its own process.
    script = """
import json, ray
from flowertune_llm.shared.devices import ray_gpu_share
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
@ray.remote
def seen():
    import os
    return [ray_gpu_share(), os.environ.get("CUDA_VISIBLE_DEVICES")]
print(json.dumps([ray.get(seen.options(num_gpus=g).remote()) for g in (0.5, 0)]))
ray.shutdown()
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    half, none = json.loads(completed.stdout.strip().splitlines()[-1])
    assert half == [0.5, "0"]
    assert none == [None, ""]  # asked for no GPU: Ray hides them all, and the client trains on CPU


def test_a_cpu_computes_the_loss_in_chunks_though_the_fused_loss_runs_there(config):
    # On a CPU trl's fused loss uses torch tiles: the probe passes, but the chunked loss is faster there.
    assert devices.fused_loss_problem("cpu") is None
    assert devices.loss_settings(config.train, CPU).loss_chunk_tokens == devices.FALLBACK_CHUNK_TOKENS
    assert config.train.loss_chunk_tokens == 0  # the run's settings are left as they are
    chunked = dataclasses.replace(config.train, loss_chunk_tokens=256)
    assert devices.loss_settings(chunked, CPU) is chunked  # a configured chunk size stays


def test_a_gpu_where_triton_cannot_compile_falls_back_to_the_chunked_loss(config, monkeypatch, caplog):
    monkeypatch.setattr(devices, "fused_loss_problem", lambda device: "RuntimeError: Failed to find C compiler")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        settings = devices.loss_settings(config.train, H200)
    assert settings.loss_chunk_tokens == devices.FALLBACK_CHUNK_TOKENS
    assert config.train.loss_chunk_tokens == 0  # the run's settings are left as they are
    assert "Failed to find C compiler" in caplog.text and "train.loss-chunk-tokens=1024" in caplog.text
    chunked = dataclasses.replace(config.train, loss_chunk_tokens=256)
    assert devices.loss_settings(chunked, H200) is chunked  # a configured chunk size stays


def test_a_gpu_where_triton_compiles_keeps_the_fused_loss(config, monkeypatch):
    monkeypatch.setattr(devices, "fused_loss_problem", lambda device: None)
    assert devices.loss_settings(config.train, H200) is config.train


@pytest.mark.parametrize(("mean", "device"), [(1.0, "cuda"), (0.0, "cpu"), (0.5, "mixed"), (None, None)])
def test_a_rounds_device_comes_from_its_clients_mean(mean, device):
    assert devices.round_device(mean) == device


def test_the_round_line_warns_when_a_gpu_was_expected_and_clients_trained_on_cpu(config, tmp_path):
    from flowertune_llm.client.model import build_adapter_skeleton
    from flowertune_llm.server.results import RunRecorder

    config.train.expect_gpu = "warn"
    recorder = RunRecorder(tmp_path / "run", config, build_adapter_skeleton(config.model, seed=0))
    record = {"round": 1, "train_replies": 2, "train_sampled": 2, "bytes_total": 0, "elapsed_s": 1.0}
    assert "WARNING: train.expect-gpu is set but all clients trained on CPU" in recorder.progress_line(
        {**record, "device": "cpu"})
    assert "some clients trained on CPU" in recorder.progress_line({**record, "device": "mixed"})
    assert "WARNING" not in recorder.progress_line({**record, "device": "cuda"})
    config.train.expect_gpu = "off"
    assert "WARNING" not in recorder.progress_line({**record, "device": "cpu"})


def test_expect_gpu_stop_ends_the_run_after_a_round_without_gpu_training():
    with pytest.raises(DeviceError, match="round 3 not every client trained on a GPU"):
        devices.check_round_device("stop", 3, None)
    with pytest.raises(DeviceError, match="device: mixed"):
        devices.check_round_device("stop", 1, "mixed")
    devices.check_round_device("stop", 1, "cuda")
    devices.check_round_device("warn", 1, "cpu")


def test_simulated_clients_ask_ray_for_a_gpu_share_only_when_given_one():
    from flowertune_llm.tools.simulation import client_resources

    assert client_resources() == {"num_cpus": 1}
    assert client_resources(0.5) == {"num_cpus": 1, "num_gpus": 0.5}


@pytest.mark.integration  # the session's finished simulation (conftest)
def test_each_round_of_a_cpu_run_records_its_device(finished_run):
    rounds = json.loads((finished_run / "metrics.json").read_text())["rounds"]
    assert [r["device"] for r in rounds] == ["cpu", "cpu"]
    assert all(r["trained_on_gpu"] == 0.0 and r["peak_gpu_reserved_mb"] == 0.0 for r in rounds)
