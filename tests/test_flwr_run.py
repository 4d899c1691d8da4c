"""End to end: `flwr run . --stream` of the default app, in a private Flower home on private ports.

The test never touches ~/.flwr nor a SuperLink already running: it gives `flwr` its own home and
ports, and stops the local SuperLink that `flwr run` leaves behind, by PID.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flower_env import flwr, local_superlink_pids, private_flwr_env, stop_pids

pytestmark = pytest.mark.slow


def test_flwr_run_default_app_end_to_end(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    env = private_flwr_env(flwr_home)
    user_home_flwr = Path.home() / ".flwr"
    user_home_before = sorted(str(p) for p in user_home_flwr.rglob("*")) if user_home_flwr.exists() else None
    results = tmp_path / "results"
    overrides = f"num-server-rounds=2 results.dir='{results}' results.run-name='e2e'"
    try:
        completed = flwr(["run", ".", "--stream", "--run-config", overrides], env)
    finally:
        stop_pids(local_superlink_pids(flwr_home))
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "Round 2/2: 2/2 clients replied" in output, output[-4000:]
    metrics = json.loads((results / "e2e" / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2
    assert metrics["rounds"][1]["train_loss"] < metrics["rounds"][0]["train_loss"]
    assert (results / "e2e" / "adapter-final" / "adapter_model.safetensors").is_file()
    assert not local_superlink_pids(flwr_home)
    user_home_after = sorted(str(p) for p in user_home_flwr.rglob("*")) if user_home_flwr.exists() else None
    assert user_home_after == user_home_before
