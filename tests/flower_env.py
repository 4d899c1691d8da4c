"""Helpers for tests that run Flower's own processes: a private Flower home, free ports, stop by PID.

Nothing here touches ~/.flwr or a SuperLink someone else started: every `flwr` command gets its own
FLWR_HOME and ports, and only processes found under that home, or started by the test, are stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO_ROOT

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """Return a loopback TCP port that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def private_flwr_env(flwr_home: Path) -> dict[str, str]:
    """Return an environment whose `flwr` uses `flwr_home` and, for the local SuperLink, free ports."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        # The app's dependencies are already installed here; a per-run `uv sync` would fetch them again.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": str(VENV_BIN) + os.pathsep + os.environ.get("PATH", ""),
    }


def flwr(arguments: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `flwr <arguments>` in the repository root; return the finished process (output as text)."""
    return subprocess.run([str(VENV_BIN / "flwr"), *arguments], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def local_superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of local SuperLinks whose log file lies in this Flower home (so: the test's alone)."""
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


def stop_pids(pids: list[int]) -> None:
    """SIGTERM the processes, then SIGKILL those still there after 15 s."""
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


def run_process_pids(flwr_home: Path) -> dict[int, str]:
    """PIDs (with command lines) of a run's processes started under this Flower home.

    Every process the local SuperLink starts inherits its FLWR_HOME; the SuperLink and its
    SuperExec serve every run and are left out (tests stop them by PID at the end).
    """
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" not in command and "flower-superexec" not in command:
            found[int(entry.name)] = command
    return found


def start_local_superlink(env: dict[str, str], tries: int = 3) -> None:
    """Start this home's local SuperLink (with `flwr ls`) before a test's run, retrying its start.

    flwr 1.42 gives a starting local SuperLink 15 s; a loaded machine can take longer, and the
    SuperLink then comes up anyway, so a second `flwr ls` finds it.
    """
    for _ in range(tries):
        listed = flwr(["ls"], env, timeout=300)
        if listed.returncode == 0:
            return
    raise AssertionError("the local SuperLink did not start:\n" + listed.stdout + listed.stderr)
