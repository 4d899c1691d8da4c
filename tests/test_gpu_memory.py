"""Memory figures on CPU: peaks reset per message, GPU counters read through a fake torch.cuda, models freed."""

from __future__ import annotations

import dataclasses
import gc
import sys
import types
import weakref

import pytest
import torch

from flowertune_llm.client import kept_model
from flowertune_llm.client.data import load_client_data
from flowertune_llm.client.model import load_tokenizer
from flowertune_llm.client.training import train_adapter
from flowertune_llm.shared import telemetry
from flowertune_llm.tools import memory_report


@pytest.fixture(autouse=True)
def no_kept_model():
    kept_model._kept = None
    yield
    kept_model._kept = None


def test_a_cpu_reply_carries_zero_gpu_figures_under_the_gpu_keys(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    metrics = telemetry.peak_memory_metrics()
    # The same names as a GPU client's: replies averaged together must share them.
    assert set(metrics) == {"peak-rss-mb", "peak-gpu-allocated-mb", "peak-gpu-reserved-mb"}
    assert metrics["peak-rss-mb"] > 0 and metrics["peak-gpu-allocated-mb"] == metrics["peak-gpu-reserved-mb"] == 0.0


def test_on_a_gpu_the_peaks_are_reset_and_both_allocated_and_reserved_reported(monkeypatch):
    counters = {"allocated": 3 * 2**30, "reserved": 4 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: counters.update(allocated=2**20, reserved=2**21))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: counters["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: counters["reserved"])
    assert telemetry.peak_memory_metrics()["peak-gpu-reserved-mb"] == 4096.0
    telemetry.reset_peak_memory()
    metrics = telemetry.peak_memory_metrics()
    assert (metrics["peak-gpu-allocated-mb"], metrics["peak-gpu-reserved-mb"]) == (1.0, 2.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the RSS high-water mark resets on Linux only")
def test_the_rss_peak_of_an_earlier_message_does_not_count_after_a_reset():
    spike = bytearray(400 * 2**20)  # 400 MB, touched: resident
    before = telemetry.peak_memory_metrics()["peak-rss-mb"]
    del spike
    telemetry.reset_peak_memory()
    after = telemetry.peak_memory_metrics()["peak-rss-mb"]
    assert after < before - 300


def test_a_replaced_model_is_freed_at_once_and_the_gpu_cache_emptied(config, monkeypatch):
    emptied = []
    train_data, _ = load_client_data(config.dataset, 0, 2)
    old = kept_model.peft_model(config.model, reuse=True)
    # A round of training leaves trl's and accelerate's references on the model (a cycle).
    settings = dataclasses.replace(config.train, max_steps=1)
    train_adapter(old, load_tokenizer(config.model), train_data, settings, learning_rate=1e-3, seed=0)
    alive = weakref.ref(old)
    del old
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(alive() is None))
    monkeypatch.setattr(kept_model, "build_peft_model", lambda settings: torch.nn.Linear(1, 1))
    other = dataclasses.replace(config.model, lora=dataclasses.replace(config.model.lora, r=4))
    gc.disable()  # only the replacement itself may collect it
    try:
        kept_model.peft_model(other, reuse=True)
        assert alive() is None
    finally:
        gc.enable()
    assert emptied == [True]  # after the old model was gone


def fake_pynvml(monkeypatch, processes: list[tuple[int, int | None]]) -> None:
    """Stand in nvidia-ml-py with one GPU running `processes` (pid, bytes used)."""
    running = [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in processes]
    module = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetComputeRunningProcesses=lambda handle: running,
    )
    monkeypatch.setitem(sys.modules, "pynvml", module)


def test_nvml_gives_the_process_figure_or_none(monkeypatch):
    fake_pynvml(monkeypatch, [(41, 3 * 2**30), (42, 2**30), (43, None)])
    assert memory_report.gpu_process_memory_mb(41) == 3072.0
    assert memory_report.gpu_process_memory_mb(43) is None  # NVML could not say
    assert memory_report.gpu_process_memory_mb(44) is None  # e.g. a container's PID namespace
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert memory_report.gpu_process_memory_mb(41) is None


def test_each_measurement_process_sees_one_gpu(monkeypatch):
    from flowertune_llm.shared import devices

    seen = {}

    def fake_run(command, env, **kwargs):
        seen.update(env)
        return types.SimpleNamespace(returncode=0, stdout=memory_report.RESULT_PREFIX + '{"peak_rss_mb": 1.0}\n',
                                     stderr="")

    monkeypatch.setattr(devices, "visible_gpus", lambda: ["2", "3"])
    monkeypatch.setattr(memory_report.subprocess, "run", fake_run)
    assert memory_report.run_measurement({}, "app", 1) == {"peak_rss_mb": 1.0}
    assert seen["CUDA_VISIBLE_DEVICES"] == "2"


def test_the_compared_figure_is_nvml_then_the_larger_reserved_peak_then_rss():
    figures = {"peak_rss_mb": 512.0, "peak_gpu_reserved_mb": 2048.0, "peak_gpu_load_reserved_mb": 3072.0}
    assert memory_report.Measurement("s", "app", figures).peak_gb == 3.0  # the load spike was higher
    assert memory_report.Measurement("s", "app", {**figures, "gpu_process_nvml_mb": 4096.0}).peak_gb == 4.0
    assert memory_report.Measurement("s", "app", {"peak_rss_mb": 512.0}).peak_gb == 0.5
