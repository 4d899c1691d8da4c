"""The local deployment's pieces, without starting Flower: credentials, node data files, argument checks."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from flowertune_llm.builtin.world import BUILTIN_DATASET_FILE
from flowertune_llm.shared.flower_compat import load_supernode_public_key
from flowertune_llm.tools.credentials import make_supernode_key, make_tls_files
from flowertune_llm.tools.local_deployment import (
    DeploymentError,
    StartedProcess,
    is_running,
    process_tree,
    start_process,
    stop_process_tree,
    supernode_command,
    up,
    write_node_data,
)


def test_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path):
    files = make_tls_files(tmp_path, ["127.0.0.1", "localhost", "10.1.2.3", "superlink.example.org"])
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    key = load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert files.server_key.stat().st_mode & 0o077 == 0


def test_supernode_key_is_what_flower_reads(tmp_path):
    pair = make_supernode_key(tmp_path, "node")
    private = load_ssh_private_key(pair.private_key.read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert load_supernode_public_key(pair.public_key)  # as `flwr supernode register` loads it
    assert pair.private_key.stat().st_mode & 0o077 == 0


def test_node_data_files_split_the_builtin_data(tmp_path):
    paths = write_node_data(tmp_path, 3)
    parts = [path.read_text().splitlines() for path in paths]
    everything = BUILTIN_DATASET_FILE.read_text().splitlines()
    assert sorted(sum(parts, [])) == sorted(everything)
    sizes = [len(part) for part in parts]
    assert sum(sizes) == len(everything) and max(sizes) - min(sizes) <= 1
    assert all(json.loads(line)["instruction"] for line in parts[0])


def test_wrong_data_files_stop_before_anything_starts(tmp_path):
    with pytest.raises(DeploymentError, match="gives 1 files for 2 SuperNodes"):
        up(tmp_path / "d", 2, [tmp_path / "a.jsonl"])
    with pytest.raises(DeploymentError, match="no such file"):
        up(tmp_path / "d", 1, [tmp_path / "a.jsonl"])
    assert not (tmp_path / "d").exists()


def test_stop_leaves_a_reused_pid_alone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        # The recorded program does not match what runs under this PID now: not ours, not touched.
        assert process_tree(sleeper.pid, "flower-supernode") == []
        stop_process_tree(StartedProcess("supernode-0", sleeper.pid, "", "flower-supernode"), grace_s=0.5)
        assert sleeper.poll() is None
        stop_process_tree(StartedProcess("sleeper", sleeper.pid, "", "time.sleep"), grace_s=5)
        assert sleeper.wait(timeout=5) is not None
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def _start_with_a_child(child_code: str, then: str) -> tuple[subprocess.Popen, int]:
    """Start a Python process (its own session) that starts a child, waits until it is ready, then runs `then`."""
    program = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}], stdout=subprocess.PIPE, text=True)\n"
        "child.stdout.readline()\n"
        "print(child.pid, flush=True)\n"
        f"{then}\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    return parent, int(parent.stdout.readline())


def _end(parent: subprocess.Popen, child: int) -> None:
    for pid in (parent.pid, child):
        if is_running(pid):
            psutil.Process(pid).kill()
    parent.wait()


def test_stop_ends_the_process_and_a_child_that_ignores_sigterm():
    # The child ignores SIGTERM: only the kill after the grace period ends it.
    stubborn = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(600)")
    parent, child = _start_with_a_child(stubborn, "time.sleep(600)")
    try:
        assert process_tree(parent.pid, "subprocess.Popen") == [parent.pid, child]
        stop_process_tree(StartedProcess("node", parent.pid, "", "subprocess.Popen"), grace_s=0.5)
        assert not is_running(parent.pid) and not is_running(child)
    finally:
        _end(parent, child)


def test_stop_ends_a_flower_process_its_exited_leader_left_in_the_group():
    # As a killed SuperNode leaves its flwr-clientapp: reparented, but still in the started group.
    orphan = "import time; print('ready', flush=True); time.sleep(600)  # flwr-clientapp"
    parent, child = _start_with_a_child(orphan, "")
    try:
        parent.wait()
        assert is_running(child) and child not in psutil.Process().children(recursive=True)
        stop_process_tree(StartedProcess("supernode-0", parent.pid, "", "flower-supernode"), grace_s=5)
        assert not is_running(child)
    finally:
        _end(parent, child)


def test_a_supernode_gets_the_quantized_cache_in_its_node_config(tmp_path):
    command = supernode_command("127.0.0.1:1", tmp_path / "ca.crt", tmp_path / "key", tmp_path / "d.jsonl",
                                tmp_path / "quantized-cache")
    node_config = command[command.index("--node-config") + 1]
    assert node_config == f"data-path='{tmp_path / 'd.jsonl'}' quantized-cache-dir='{tmp_path / 'quantized-cache'}'"
    without = supernode_command("127.0.0.1:1", tmp_path / "ca.crt", tmp_path / "key", tmp_path / "d.jsonl")
    assert without[without.index("--node-config") + 1] == f"data-path='{tmp_path / 'd.jsonl'}'"


def test_a_started_process_sees_only_its_own_gpu(tmp_path):
    # Its ClientApp processes inherit the variable: one GPU per SuperNode.
    log = tmp_path / "node.log"
    pid = start_process([sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"], log, gpu="1")
    deadline = time.monotonic() + 60
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.read_text().strip() == "1"
