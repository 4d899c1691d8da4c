"""End to end: `flwr run . --stream` of the default app, in a private Flower home on private ports.

The test never touches ~/.flwr nor a SuperLink already running: it gives `flwr` its own home and
ports, and stops the local SuperLink that `flwr run` leaves behind, by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of SuperLinks whose log file lies in this test's Flower home (so: ours alone)."""
    marker = str(flwr_home / "local-superlink")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in arguments]
        if any("flower-superlink" in a for a in text[:2]) and any(marker in a for a in text):
            pids.append(int(entry.name))
    return pids


def _stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_flwr_run_default_app_end_to_end(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        # The app's dependencies are already installed here; a per-run `uv sync` would fetch them again.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    }
    user_home_flwr = Path.home() / ".flwr"
    user_home_before = sorted(str(p) for p in user_home_flwr.rglob("*")) if user_home_flwr.exists() else None
    results = tmp_path / "results"
    overrides = f"num-server-rounds=2 results.dir='{results}' results.run-name='e2e'"
    try:
        completed = subprocess.run(
            [str(Path(venv_bin) / "flwr"), "run", ".", "--stream", "--run-config", overrides],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
    finally:
        _stop(_superlink_pids(flwr_home))
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "Round 2/2: 2/2 clients replied" in output, output[-4000:]
    metrics = json.loads((results / "e2e" / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2
    assert metrics["rounds"][1]["train_loss"] < metrics["rounds"][0]["train_loss"]
    assert (results / "e2e" / "adapter-final" / "adapter_model.safetensors").is_file()
    assert not _superlink_pids(flwr_home)
    user_home_after = sorted(str(p) for p in user_home_flwr.rglob("*")) if user_home_flwr.exists() else None
    assert user_home_after == user_home_before
