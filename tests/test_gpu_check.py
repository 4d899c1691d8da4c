"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check, at toy size on the CPU, passes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO_ROOT

# Every step of the GPU check in subprocesses, a simulation among them.
pytestmark = pytest.mark.slow


def test_the_gpu_check_dry_run_goes_through_every_step(tmp_path):
    output = tmp_path / "gpu-check.json"
    completed = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--budget-s", "1500",
         "--output", str(output), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, check=False, timeout=1800, env={**os.environ, "GPU_CHECK_LIMIT_S": "1700"},
    )
    summary = json.loads(output.read_text())
    steps = summary["steps"]
    failed = {name: step.get("error_tail", step.get("reason")) for name, step in steps.items()
              if step["status"] != "ok" and step.get("applicable") is not False}
    assert not failed, failed
    assert completed.returncode == 0 and "GPU-CHECK summary passed=True" in completed.stdout
    assert list(steps) == ["environment", "bitsandbytes", "fused-loss", "ray-actors", "device-tests",
                           "quantized-cache", "training", "kept-model", "simulation", "multi-device", "memory-report"]
    assert steps["ray-actors"]["no_gpu"]["CUDA_VISIBLE_DEVICES"] == "" and steps["ray-actors"]["half_gpu"]["share"] == 0.5
    assert steps["quantized-cache"]["4bit_equal"] and steps["quantized-cache"]["8bit_equal"]
    assert [row["variant"] for row in steps["training"]["variants"]] == ["app", "chunked-loss", "reference-stack"]
    assert [r["device"] for r in steps["simulation"]["rounds"]] == ["cpu", "cpu"]
    # No GPU in a dry run: the 2-GPU step says it is skipped, and why.
    assert steps["multi-device"]["status"] == "skipped" and "needs 2 GPUs" in steps["multi-device"]["reason"]
