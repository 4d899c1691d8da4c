"""End to end: `flowertune run` and `flowertune resume` through `flwr run`, in a private Flower home.

Each test gives `flwr` its own home and ports and stops the local SuperLink it leaves behind by PID.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from flower_env import flwr, local_superlink_pids, private_flwr_env, run_process_pids, start_local_superlink, stop_pids

pytestmark = pytest.mark.slow


def flowertune(arguments: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `flowertune <arguments>` in the repository root; return the finished process."""
    return subprocess.run([sys.executable, "-m", "flowertune_llm.tools.cli", *arguments], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_a_failing_run_exits_non_zero_with_the_apps_message_last(tmp_path):
    home = tmp_path / "flwr-home"
    env = private_flwr_env(home)
    (tmp_path / "results" / "taken").mkdir(parents=True)
    try:
        start_local_superlink(env)
        done = flowertune(["run", ".", "--run-config",
                           f"results.dir='{tmp_path / 'results'}' results.run-name='taken'"], env)
    finally:
        stop_pids(local_superlink_pids(home))
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ResultsError: results.run-name:") and "already holds a run" in last, done.stderr
    assert "Traceback" not in done.stdout + done.stderr  # the one-line error, not Flower's 40 lines


def test_a_run_with_own_settings_finishes_then_resumes_with_them(tmp_path):
    home = tmp_path / "flwr-home"
    env = private_flwr_env(home)
    results = tmp_path / "results"
    folder = results / "mine"
    try:
        start_local_superlink(env)
        first = flowertune(["run", ".", "--run-config", f"num-server-rounds=1 train.max-steps=2 model.lora.r=8 "
                            f"results.dir='{results}' results.run-name='mine'"], env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "Round 1/1:" in first.stdout and "Rounds: 1/1 finished." in first.stdout
        assert f"Adapter: {folder / 'adapter-final'}" in first.stdout
        assert f"flowertune resume {folder} --num-server-rounds 6" in first.stdout
        assert "DeprecationWarning" not in first.stdout + first.stderr  # quiet by default
        second = flowertune(["resume", str(folder), "--num-server-rounds", "2"], env)
    finally:
        stop_pids(local_superlink_pids(home))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Resuming after round 1 of 2" in second.stdout and "Round 2/2:" in second.stdout
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2] and metrics["resumed-after-round"] == [1]
    assert "model.lora.r = 8" in (folder / "run-config.toml").read_text()


def test_ctrl_c_stops_the_run_and_leaves_none_of_its_processes(tmp_path):
    home = tmp_path / "flwr-home"
    env = private_flwr_env(home)
    results = tmp_path / "results"
    try:
        start_local_superlink(env)
    except BaseException:
        stop_pids(local_superlink_pids(home))
        raise
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "flowertune_llm.tools.cli", "run", ".", "--run-config",
         f"num-server-rounds=50 results.dir='{results}' results.run-name='stop-me'"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # A runner started in the background (`cmd &`) ignores SIGINT, and children inherit that;
        # the user's terminal does not, so give the wrapper the default disposition a terminal gives.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert wrapper.stdout is not None
        seen = []
        for line in wrapper.stdout:  # until the ServerApp is running
            seen.append(line)
            if line.startswith("Results of this run go to"):
                break
        assert run_process_pids(home), "".join(seen)
        wrapper.send_signal(signal.SIGINT)
        rest = wrapper.communicate(timeout=300)[0]
        output = "".join(seen) + rest
        assert wrapper.returncode == 130, output
        assert "Interrupted: stopped run" in output
        # The run's processes end after `flwr stop`; wait for that, up to a generous bound.
        deadline = time.monotonic() + 120
        while run_process_pids(home) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not run_process_pids(home), run_process_pids(home)
        listed = json.loads(flwr(["ls", "--format", "json"], env).stdout)
        assert [run["status"] for run in listed["runs"]] == ["finished:stopped"]
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        stop_pids(local_superlink_pids(home))
        stop_pids(list(run_process_pids(home)))
