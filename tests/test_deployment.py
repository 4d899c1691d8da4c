"""A real Flower deployment on loopback: `flwr run . remote-deployment` through a SuperLink and SuperNodes.

`flowertune deploy up` starts a `flower-superlink` (TLS, SuperNode
authentication on) and two `flower-supernode` processes, each a data owner with its own file, in a
private Flower home on free ports; `down` stops them by PID. The tests check that the app trains
through it as in simulation, that a SuperNode with an unregistered key is refused, and that a
SuperNode killed mid-round costs the run a timeout, not a hang; and that a client trains on several
processes (`train.num-devices`) from the ClientApp process a SuperNode starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from flowertune_llm.builtin.world import generate_examples, write_jsonl
from flowertune_llm.tools.credentials import make_supernode_key
from flowertune_llm.tools.local_deployment import (
    Deployment,
    StartedProcess,
    is_running,
    process_tree,
    stop_process_tree,
    supernode_command,
)

from conftest import REPO_ROOT
from flower_env import flwr, private_flwr_env

pytestmark = pytest.mark.slow

CONNECTION = "remote-deployment"
# Records in each node's own file; 10% is held out, so the nodes train on 90 and 126 examples.
NODE_RECORDS = (100, 140)
NODE_TRAIN_EXAMPLES = (90, 126)
# Short runs: 2 rounds of 2 local steps, no client evaluation (each message is a new client process).
RUN = "num-server-rounds=2 train.max-steps=2 strategy.fraction-evaluate=0.0"


def _launcher(arguments: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowertune_llm.tools.local_deployment", *arguments],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A running local deployment (SuperLink + 2 SuperNodes), its environment and working folder."""
    root = tmp_path_factory.mktemp("deployment")
    env = private_flwr_env(root / "flwr-home")
    files = []
    for index, count in enumerate(NODE_RECORDS):
        files.append(root / f"owner-{index}" / "train.jsonl")
        write_jsonl(generate_examples(count, seed=100 + index), files[-1])
    folder = root / "local-deployment"
    started = _launcher(["up", "--supernodes", "2", "--data-files", *map(str, files), "--dir", str(folder)], env, root)
    assert started.returncode == 0, started.stdout + started.stderr
    state = Deployment.load(folder)
    try:
        yield state, env, root
    finally:
        stopped = _launcher(["down", "--dir", str(folder)], env, root)
        for process in state.processes:  # a safety net, if `down` failed
            stop_process_tree(process)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not any(is_running(process.pid) for process in state.processes)
        assert not (folder / "deployment.json").exists()
        assert CONNECTION not in flower_config(env)["superlink"]


def flower_config(env: dict[str, str]) -> dict:
    """Return the Flower config file of the test's Flower home."""
    return tomllib.loads((Path(env["FLWR_HOME"]) / "config.toml").read_text())


def _online_nodes(env: dict[str, str]) -> set[int]:
    listed = flwr(["supernode", "list", CONNECTION, "--format", "json"], env, timeout=60)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    nodes = json.loads(listed.stdout[listed.stdout.index("{"):])["nodes"]
    return {int(node["node-id"]) for node in nodes if node["status"] == "online"}


def _rounds(folder: Path) -> list[dict]:
    return json.loads((folder / "metrics.json").read_text())["rounds"]


def test_app_trains_through_superlink_and_supernodes_over_tls(deployment):
    state, env, root = deployment
    assert flower_config(env)["superlink"][CONNECTION] == {"address": state.address, "root-certificates": state.ca_certificate}
    assert "Uvicorn running on https://" in Path(state.process("superlink").log).read_text()
    assert _online_nodes(env) == set(state.node_ids)

    # A SuperNode whose key was never registered tries to join while the run goes on.
    rogue_key = make_supernode_key(root / "rogue", "rogue")
    rogue_log = root / "rogue" / "supernode.log"
    with rogue_log.open("wb") as log:
        rogue = subprocess.Popen(
            supernode_command(state.address, Path(state.ca_certificate), rogue_key.private_key,
                              Path(state.data_files[0])),
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        completed = flwr(["run", ".", CONNECTION, "--stream", "--run-config", f"{RUN} results.run-name='deployed'"], env)
        rogue_exit = rogue.wait(timeout=60)
    finally:
        if rogue.poll() is None:
            os.killpg(rogue.pid, signal.SIGKILL)
            rogue.wait()
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]

    assert rogue_exit != 0
    assert "Failed to activate SuperNode" in rogue_log.read_text()
    assert _online_nodes(env) == set(state.node_ids)

    # The results land where the README says: results/ under the folder the SuperLink was started in.
    folder = Path(state.results_base) / "results" / "deployed"
    assert Path(state.results_base) == root
    rounds = _rounds(folder)
    assert [(r["train_sampled"], r["train_replies"]) for r in rounds] == [(2, 2), (2, 2)]
    assert "Round 2/2: 2/2 clients replied" in output
    # Each node trained on its own file: 90 + 126 examples, not a slice of the built-in data.
    assert [r["train_examples"] for r in rounds] == [sum(NODE_TRAIN_EXAMPLES)] * 2
    # The nodes trained: every LoRA B matrix (zero at initialisation) moved, the losses are finite.
    # Whether two 2-step rounds lower the loss depends on each node's seed (its data file's path,
    # a fresh temporary folder each run), so learning itself is checked in the simulation tests.
    assert all(0 < r["train_loss"] < 10 for r in rounds)
    for name in ("run-config.toml", "checkpoint.safetensors", "adapter-final/adapter_model.safetensors",
                 "adapter-final/adapter_config.json"):
        assert (folder / name).is_file(), name
    final = load_file(folder / "adapter-final" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in final.items() if "lora_B" in name]
    assert lora_b and all(bool(tensor.abs().sum() > 0) for tensor in lora_b)


def _children_running(node: StartedProcess, marker: bytes) -> set[int]:
    """Return the live processes under the SuperNode `node` whose command line contains `marker`."""
    found = set()
    for pid in process_tree(node.pid, node.program):
        try:
            if pid != node.pid and marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            continue
    return found


def _device_workers(state: Deployment) -> set[int]:
    """Return the live multi-device training workers under the SuperNodes (torchrun itself excluded)."""
    nodes = [process for process in state.processes if process.name.startswith("supernode")]
    launched = set().union(*(_children_running(node, b"flowertune_llm.client.multi_device") for node in nodes))
    launchers = set().union(*(_children_running(node, b"torch.distributed.run") for node in nodes))
    # A worker is a child of torchrun: a process a worker forks shows the worker's command line until it execs.
    workers = set()
    for pid in launched - launchers:
        try:
            if psutil.Process(pid).ppid() in launchers:
                workers.add(pid)
        except psutil.NoSuchProcess:
            continue
    return workers


@contextlib.contextmanager
def _flwr_run(run_config: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Start `flwr run . remote-deployment --stream` (output into `log`); SIGKILL its group if still running at the end."""
    with log.open("w") as stream:
        run = subprocess.Popen([str(Path(sys.executable).parent / "flwr"), "run", ".", CONNECTION, "--stream",
                                "--run-config", run_config], cwd=REPO_ROOT, env=env, stdout=stream,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield run
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()


def test_clients_train_on_two_processes_each_through_supernodes(deployment):
    # Runs before the test that kills a SuperNode: both nodes train, each on 2 CPU processes (gloo).
    state, env, root = deployment
    run_config = ("num-server-rounds=1 train.max-steps=2 strategy.fraction-evaluate=0.0 train.num-devices=2 "
                  "results.run-name='two-devices'")
    log = root / "two-devices-run.log"
    seen: set[int] = set()
    with _flwr_run(run_config, env, log) as run:
        deadline = time.monotonic() + 540
        while run.poll() is None and time.monotonic() < deadline:
            seen |= _device_workers(state)
            time.sleep(0.2)
        returncode = run.wait(timeout=5)
    output = log.read_text()
    assert returncode == 0, output[-4000:]
    # Each node's ClientApp (a flwr-clientapp process the SuperNode started) launched 2 workers.
    assert len(seen) == 4, output[-4000:]
    assert not _device_workers(state)
    rounds = _rounds(Path(state.results_base) / "results" / "two-devices")
    assert [(r["train_sampled"], r["train_replies"]) for r in rounds] == [(2, 2)]
    assert rounds[0]["train_examples"] == sum(NODE_TRAIN_EXAMPLES) and 0 < rounds[0]["train_loss"] < 10
    final = load_file(Path(state.results_base) / "results" / "two-devices" / "adapter-final" / "adapter_model.safetensors")
    assert all(bool(tensor.abs().sum() > 0) for name, tensor in final.items() if "lora_B" in name)


def test_killed_supernode_costs_a_timeout_not_a_hang(deployment):
    state, env, root = deployment
    victim = state.process("supernode-1")
    run_config = (f"{RUN} strategy.round-timeout=45.0 strategy.min-available-nodes=1 "
                  "strategy.min-train-nodes=1 results.run-name='killed'")
    log = root / "killed-run.log"
    with _flwr_run(run_config, env, log) as run:
        # Kill the node (and its ClientApp) as soon as it has started training in round 1.
        deadline = time.monotonic() + 180
        while not _children_running(victim, b"flwr-clientapp"):
            assert time.monotonic() < deadline and run.poll() is None, log.read_text()[-4000:]
            time.sleep(0.2)
        for pid in process_tree(victim.pid, victim.program):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        returncode = run.wait(timeout=300)
    output = log.read_text()
    assert returncode == 0, output[-4000:]

    rounds = _rounds(Path(state.results_base) / "results" / "killed")
    assert len(rounds) == 2
    # Round 1 sampled both nodes; only the survivor (node 0, 90 examples) replied.
    assert (rounds[0]["train_sampled"], rounds[0]["train_replies"]) == (2, 1)
    assert all(r["train_replies"] == 1 and r["train_examples"] == NODE_TRAIN_EXAMPLES[0] for r in rounds)
    assert "Round 1/2: 1/2 clients replied" in output
    lost = "sent no train reply within strategy.round-timeout"
    failed = "train failed, reported by the SuperLink: Error: Node Unavailable"
    assert lost in output or failed in output, output[-4000:]
    assert (Path(state.results_base) / "results" / "killed" / "adapter-final" / "adapter_model.safetensors").is_file()
