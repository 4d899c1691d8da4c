"""A real Flower deployment on this machine: one SuperLink and N SuperNodes, TLS and node authentication.

Every process is Flower's own binary (`flower-superlink`, `flower-supernode`), every admin step
Flower's CLI (`flwr supernode register`, `flwr supernode list`), and the connection is written with
Flower's own config-file functions (flwr 1.42 has no command for it); this module only prepares
files, picks free loopback ports, starts the processes and remembers their PIDs:
    flowertune deploy up --supernodes 2     # then: flwr run . remote-deployment --stream
    flowertune deploy down
`up` writes, under `--dir` (default `local-deployment/`, git-ignored, so never bundled into the app):
  certificates/, supernode-keys/   a test CA, the SuperLink's certificate, one key pair per SuperNode
  data/supernode-<i>.jsonl         each SuperNode's own training data (or the files given with --data-files)
  quantized-cache/                 the nodes' cache of quantized bases (none with --no-quantized-cache)
  logs/                            superlink.log, supernode-<i>.log, flwr-cli.log
  deployment.json                  PIDs, ports and node IDs, read by `down`
and adds the SuperLink connection (`remote-deployment`) to the Flower config file ($FLWR_HOME/config.toml,
default ~/.flwr); `down` stops every process by PID and removes the connection again.
On a GPU machine SuperNode i sees GPU i mod (number of GPUs) only (its CUDA_VISIBLE_DEVICES, which
its ClientApp processes inherit): trl trains on one GPU per process, and without a pin every node
would use GPU 0.
The ServerApp runs under the SuperLink, whose working directory is where `up` was run: a run's
`results.dir` (default `results`) is relative to that folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from flowertune_llm.builtin.world import BUILTIN_DATASET_FILE
from flowertune_llm.shared.flower_compat import add_superlink_connection, flower_home, remove_superlink_connection
from flowertune_llm.tools.credentials import make_supernode_key, make_tls_files

DEFAULT_DIR = Path("local-deployment")
DEFAULT_CONNECTION = "remote-deployment"
# Under --dir: a ClientApp process serves one message, so without a cache every round re-quantizes.
DEFAULT_CACHE = "quantized-cache"
STATE_FILE = "deployment.json"
HOST = "127.0.0.1"
START_TIMEOUT_S = 90.0
STOP_GRACE_S = 15.0


class DeploymentError(RuntimeError):
    """The local deployment could not be started or stopped as asked."""


@dataclass
class StartedProcess:
    """A process this launcher started (the leader of its own process group)."""

    name: str
    pid: int
    log: str
    program: str
    gpu: str | None = None  # the one GPU it sees (CUDA_VISIBLE_DEVICES), None: as the launcher


@dataclass
class Deployment:
    """What `up` started, saved as `deployment.json` so that `down` can stop it."""

    folder: str
    connection: str
    address: str
    ca_certificate: str
    flwr_home: str
    results_base: str
    processes: list[StartedProcess] = field(default_factory=list)
    node_ids: list[int] = field(default_factory=list)
    data_files: list[str] = field(default_factory=list)

    def save(self) -> None:
        """Write the state file."""
        (Path(self.folder) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> Deployment:
        """Read the state file `up` wrote into `folder`."""
        path = folder / STATE_FILE
        if not path.is_file():
            raise DeploymentError(f"no local deployment in '{folder}' ({STATE_FILE} not found)")
        state = json.loads(path.read_text(encoding="utf-8"))
        state["processes"] = [StartedProcess(**process) for process in state["processes"]]
        return cls(**state)

    def process(self, name: str) -> StartedProcess:
        """Return the started process called `name` (`superlink`, `supernode-0`, ...)."""
        return next(process for process in self.processes if process.name == name)


# --- Processes ------------------------------------------------------------------------------------

def free_port() -> int:
    """Return a TCP port on the loopback interface that is free now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def flower_environment() -> dict[str, str]:
    """Return this environment with this Python's bin folder first on PATH.

    `flower-superlink` and `flower-supernode` start `flower-superexec` and `flwr-*app` by name.
    """
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def flower_binary(name: str) -> str:
    """Return the path of a Flower executable installed next to this Python."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise DeploymentError(f"'{name}' not found: install the app (`pip install -e .`) in this environment")
    return found


def start_process(command: list[str], log: Path, cwd: Path | None = None, gpu: str | None = None) -> int:
    """Start `command` in a process group of its own (seeing GPU `gpu` only, if given), output to `log`; return its PID."""
    from flowertune_llm.shared.devices import one_gpu_environment

    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as stream:
        process = subprocess.Popen(
            command, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=one_gpu_environment(flower_environment(), gpu), start_new_session=True,
        )
    return process.pid


def _alive(process: psutil.Process) -> bool:
    """Return whether `process` is live: a zombie has exited and only waits for its parent to reap it."""
    try:
        return process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def is_running(pid: int) -> bool:
    """Return whether `pid` is a live (not zombie) process."""
    try:
        return _alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _command_line(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _started_tree(pid: int, program: str) -> list[psutil.Process]:
    """Return a started process, its live descendants and the Flower processes left in its group."""
    tree: list[psutil.Process] = []
    try:
        leader = psutil.Process(pid)
        if _alive(leader):
            if program not in _command_line(leader):
                return []
            tree = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    # start_new_session made the started PID its group's ID; a killed SuperNode's ClientApp lives on
    # in that group, reparented away from it, where children() no longer finds it.
    for other in psutil.process_iter():
        try:
            in_group = os.getpgid(other.pid) == pid
        except OSError:  # gone since it was listed
            continue
        if in_group and other not in tree and any(word in _command_line(other) for word in ("flwr", "flower")):
            tree.append(other)
    return [process for process in tree if _alive(process)]


def process_tree(pid: int, program: str) -> list[int]:
    """Return the PIDs of a started process, its live descendants and the rest of its process group.

    Nothing if `pid` now belongs to another program (the PID was reused after ours exited); only the
    Flower processes left in its group if it is gone (children of a killed SuperNode outlive it).
    """
    return [process.pid for process in _started_tree(pid, program)]


def stop_process_tree(process: StartedProcess, grace_s: float = STOP_GRACE_S) -> None:
    """Stop a started process, its descendants and its group: SIGTERM, then SIGKILL after `grace_s`."""
    tree = _started_tree(process.pid, process.program)
    # psutil signals a Process only while its PID still names the process found above (creation
    # time checked), so one that exited meanwhile and whose PID was reused is left alone.
    for target in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            target.terminate()
    _, left = psutil.wait_procs(tree, timeout=grace_s)
    for target in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            target.kill()
    # SIGKILL cannot be caught or delayed by the process: waiting lets `down` return with it gone.
    psutil.wait_procs(left, timeout=grace_s)


def _wait_for_port(port: int, pid: int, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_running(pid):
            raise DeploymentError(f"flower-superlink exited at start-up; see {log}:\n{_tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise DeploymentError(f"flower-superlink did not open port {port} within {timeout_s:.0f} s; see {log}")


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- Flower CLI and config file -------------------------------------------------------------------

def flwr_cli(arguments: list[str], log: Path) -> str:
    """Run `flwr <arguments>`, append its output to `log`, return its stdout; raise if it fails."""
    completed = subprocess.run(
        [flower_binary("flwr"), *arguments], capture_output=True, text=True, env=flower_environment(), timeout=120,
    )
    with log.open("a", encoding="utf-8") as stream:
        stream.write(f"$ flwr {' '.join(arguments)}\n{completed.stdout}{completed.stderr}\n")
    if completed.returncode != 0:
        raise DeploymentError(f"`flwr {' '.join(arguments)}` failed:\n{completed.stdout}{completed.stderr}")
    return completed.stdout


def _json_output(text: str) -> dict:
    return json.loads(text[text.index("{"):])


def register_supernode(public_key: Path, connection: str, log: Path) -> int:
    """Register a SuperNode's public key with the SuperLink; return the node ID it was given."""
    output = flwr_cli(["supernode", "register", str(public_key), connection, "--format", "json"], log)
    return int(_json_output(output)["node-id"])


def online_node_ids(connection: str, log: Path) -> set[int]:
    """Return the IDs of the SuperNodes the SuperLink reports online."""
    output = flwr_cli(["supernode", "list", connection, "--format", "json"], log)
    return {int(node["node-id"]) for node in _json_output(output)["nodes"] if node["status"] == "online"}


# --- SuperLink and SuperNodes ---------------------------------------------------------------------

def superlink_command(port: int, certificates: Path) -> list[str]:
    """Return the SuperLink's command: TLS on, SuperNode authentication on, the app's venv as is."""
    return [
        flower_binary("flower-superlink"),
        "--ssl-ca-certfile", str(certificates / "ca.crt"),
        "--ssl-certfile", str(certificates / "server.crt"),
        "--ssl-keyfile", str(certificates / "server.key"),
        "--enable-supernode-auth",
        # The app's dependencies are installed here already; `uv sync` per run would fetch them again.
        "--disable-runtime-dependency-installation",
        "--host", HOST, "--port", str(port),
    ]


def supernode_command(
    address: str, ca_certificate: Path, private_key: Path, data_path: Path, quantized_cache_dir: Path | None = None
) -> list[str]:
    """Return a SuperNode's command: dial the SuperLink over TLS, sign in with its key, train on its file."""
    node_config = f"data-path='{data_path}'"
    if quantized_cache_dir is not None:
        node_config += f" quantized-cache-dir='{quantized_cache_dir}'"
    return [
        flower_binary("flower-supernode"),
        "--superlink", address,
        "--root-certificates", str(ca_certificate),
        "--auth-supernode-private-key", str(private_key),
        "--node-config", node_config,
        # Its own local API port for its ClientApp processes: two SuperNodes on one host need two.
        "--host", HOST, "--port", str(free_port()),
    ]


def write_node_data(folder: Path, num_nodes: int) -> list[Path]:
    """Split the built-in data into one file per SuperNode (record k goes to node k mod N)."""
    lines = BUILTIN_DATASET_FILE.read_text(encoding="utf-8").splitlines(keepends=True)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(num_nodes):
        path = folder / f"supernode-{index}.jsonl"
        path.write_text("".join(lines[index::num_nodes]), encoding="utf-8")
        paths.append(path)
    return paths


def _wait_until_online(deployment: Deployment, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    expected = set(deployment.node_ids)
    while True:
        for process in deployment.processes:
            if not is_running(process.pid):
                raise DeploymentError(f"{process.name} exited at start-up; see {process.log}:\n{_tail(Path(process.log))}")
        online = online_node_ids(deployment.connection, log)
        if expected <= online:
            return
        if time.monotonic() > deadline:
            raise DeploymentError(f"SuperNodes {sorted(expected - online)} not online after {timeout_s:.0f} s; see {log.parent}")
        time.sleep(1.0)


def up(
    folder: Path,
    num_supernodes: int = 2,
    data_files: Sequence[Path] = (),
    connection: str = DEFAULT_CONNECTION,
    timeout_s: float = START_TIMEOUT_S,
    quantized_cache: bool = True,
) -> Deployment:
    """Start a SuperLink and SuperNodes on loopback ports; register the nodes; add the connection."""
    from flowertune_llm.shared.devices import gpus_for_processes, visible_gpus

    folder = folder.resolve()
    if (folder / STATE_FILE).exists():
        running = [p.name for p in Deployment.load(folder).processes if is_running(p.pid)]
        if running:
            raise DeploymentError(f"a deployment in '{folder}' is running ({', '.join(running)}); stop it with `down` first")
    if data_files and len(data_files) != num_supernodes:
        raise DeploymentError(f"--data-files gives {len(data_files)} files for {num_supernodes} SuperNodes")
    for path in data_files:
        if not Path(path).is_file():
            raise DeploymentError(f"--data-files: no such file '{path}'")
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cli_log = logs / "flwr-cli.log"
    cli_log.write_text("", encoding="utf-8")

    tls = make_tls_files(folder / "certificates")
    keys = [make_supernode_key(folder / "supernode-keys", f"supernode-{i}") for i in range(num_supernodes)]
    nodes_data = [Path(p).resolve() for p in data_files] or write_node_data(folder / "data", num_supernodes)
    # One folder for all nodes of this host: entries are written atomically, the first build wins.
    cache = folder / DEFAULT_CACHE if quantized_cache else None
    nodes_gpu = gpus_for_processes(num_supernodes, visible_gpus())

    port = free_port()
    deployment = Deployment(
        folder=str(folder), connection=connection, address=f"{HOST}:{port}",
        ca_certificate=str(tls.ca_certificate), flwr_home=str(flower_home()),
        results_base=str(Path.cwd()), data_files=[str(p) for p in nodes_data],
    )
    try:
        log = logs / "superlink.log"
        pid = start_process(superlink_command(port, folder / "certificates"), log, cwd=Path.cwd())
        deployment.processes.append(StartedProcess("superlink", pid, str(log), "flower-superlink"))
        deployment.save()
        _wait_for_port(port, pid, log, timeout_s)
        add_superlink_connection(connection, deployment.address, tls.ca_certificate)
        deployment.node_ids = [register_supernode(key.public_key, connection, cli_log) for key in keys]
        for index, (key, data_path, gpu) in enumerate(zip(keys, nodes_data, nodes_gpu)):
            log = logs / f"supernode-{index}.log"
            command = supernode_command(deployment.address, tls.ca_certificate, key.private_key, data_path, cache)
            pid = start_process(command, log, gpu=gpu)
            deployment.processes.append(
                StartedProcess(f"supernode-{index}", pid, str(log), "flower-supernode", gpu=gpu))
            deployment.save()
        _wait_until_online(deployment, cli_log, timeout_s)
    except BaseException:
        _stop(deployment)
        raise
    deployment.save()
    return deployment


def _stop(deployment: Deployment) -> None:
    # SuperNodes first, so that none of them is left retrying a SuperLink that is gone.
    for process in sorted(deployment.processes, key=lambda p: p.name == "superlink"):
        stop_process_tree(process)
    remove_superlink_connection(deployment.connection, deployment.address)
    (Path(deployment.folder) / STATE_FILE).unlink(missing_ok=True)


def down(folder: Path) -> Deployment:
    """Stop every process of the deployment in `folder` by PID and remove its connection."""
    deployment = Deployment.load(folder.resolve())
    _stop(deployment)
    return deployment


def main(argv: list[str] | None = None) -> None:
    """`up` or `down` a local deployment."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start a SuperLink and SuperNodes")
    start.add_argument("--supernodes", type=int, default=None,
                       help="number of SuperNodes (default: one per --data-files file, else 2)")
    start.add_argument("--data-files", type=Path, nargs="+", default=[],
                       help="one data file per SuperNode (default: the built-in data split over the nodes)")
    start.add_argument("--no-quantized-cache", action="store_true",
                       help=f"give the nodes no quantized-base cache (default: <dir>/{DEFAULT_CACHE})")
    start.add_argument("--connection", default=DEFAULT_CONNECTION,
                       help=f"name of the SuperLink connection to add (default {DEFAULT_CONNECTION})")
    stop = commands.add_parser("down", help="stop the deployment by PID and remove its connection")
    for command in (start, stop):
        command.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                             help=f"the deployment's folder (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            supernodes = args.supernodes if args.supernodes is not None else (len(args.data_files) or 2)
            if supernodes < 1:
                parser.error("--supernodes must be >= 1")
            deployment = up(args.dir, supernodes, args.data_files, args.connection,
                            quantized_cache=not args.no_quantized_cache)
            print(f"SuperLink {deployment.address} (TLS, SuperNode authentication on), PID "
                  f"{deployment.process('superlink').pid}")
            for process, node_id, data in zip(deployment.processes[1:], deployment.node_ids, deployment.data_files):
                device = f"GPU {process.gpu}" if process.gpu is not None else "no GPU pinned"
                print(f"{process.name}: node {node_id}, PID {process.pid}, data-path={data}, {device}")
            print(f"Connection '{deployment.connection}' added to {Path(deployment.flwr_home) / 'config.toml'}")
            print(f"Logs: {Path(deployment.folder) / 'logs'}")
            print(f"Results of runs go to {Path(deployment.results_base) / 'results'} (results.dir is relative to it)")
            print(f"Run the app:  flwr run . {deployment.connection} --stream")
            print(f"Stop:         flowertune deploy down --dir {args.dir}")
        else:
            deployment = down(args.dir)
            print(f"Stopped {', '.join(p.name for p in deployment.processes)}; "
                  f"connection '{deployment.connection}' removed. Logs kept in {Path(deployment.folder) / 'logs'}")
    except DeploymentError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
