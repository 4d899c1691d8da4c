"""Measure a local deployment's rounds: wall time, ClientApp processes started, where the time goes.

Starts `flowertune deploy up` (flowertune_llm/tools/local_deployment.py: a SuperLink with TLS and
SuperNode authentication, N SuperNodes with their own data files) in a scratch folder, with a private
Flower home and free loopback ports, and runs `flwr run <checkout> remote-deployment --stream` once per
variant. It counts the `flwr-clientapp` processes the SuperNodes start during a run (each serves one
message; their logs say "Start `flwr-clientapp` process") and prints, per round, the wall time and the
clients' own phases (means over nodes, from metrics.json); then it stops every process it started, by PID.

    python benchmarks/deployment_rounds.py                          # 3 rounds: separate vs on-receipt
    python benchmarks/deployment_rounds.py --variants on-receipt --rounds 5 --run-config "train.max-steps=5"
    python benchmarks/deployment_rounds.py --baseline /tmp/old-checkout   # adds that checkout's app, as it is

The app `flwr run` bundles is what runs (Flower puts the app's folder first on sys.path): the checkout
the script lies in, or `--baseline` for the `baseline` variant; both in this Python's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The baseline is another checkout's app with its defaults (it may predate evaluate.on-receipt).
VARIANTS = {"baseline": "", "separate": "evaluate.on-receipt=false", "on-receipt": "evaluate.on-receipt=true"}
# The clients' phases in metrics.json (means over a round's replies), train first, then evaluation.
PHASES = ("time_data_s", "time_base_s", "time_adapter_load_s", "time_train_s", "time_serialize_s",
          "eval_time_exact_match_s")


def environment(scratch: Path) -> dict[str, str]:
    """Return the environment of every Flower process: a private home, this venv and this checkout first."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "FLWR_HOME": str(scratch / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def deploy(command: str, folder: Path, env: dict[str, str], supernodes: int) -> str:
    """Run `flowertune deploy up|down` (the module) in the scratch folder; return its output."""
    arguments = [command, "--dir", str(folder)] + (["--supernodes", str(supernodes)] if command == "up" else [])
    done = subprocess.run([sys.executable, "-m", "flowertune_llm.tools.local_deployment", *arguments],
                          cwd=folder.parent, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"deploy {command} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def clientapps_started(supernode_logs: list[Path]) -> int:
    """Return how many `flwr-clientapp` processes the SuperNodes have started so far (from their logs)."""
    return sum(log.read_text(errors="replace").count("Start `flwr-clientapp` process") for log in supernode_logs)


def run_variant(name: str, app: Path, run_config: str, scratch: Path, env: dict[str, str], logs: list[Path]) -> dict:
    """Run the app once through the deployment; return its rounds, the processes it started and its wall time."""
    metrics = scratch / "results" / name / "metrics.json"
    settings = f"{run_config} results.dir='{scratch / 'results'}' results.run-name='{name}'"
    log = (scratch / f"{name}.log").open("w")
    before = clientapps_started(logs)
    started = time.time()
    subprocess.run(["flwr", "run", str(app), "remote-deployment", "--stream", "--run-config", settings],
                   cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.time() - started
    log.close()
    if not metrics.is_file():
        raise SystemExit(f"{name}: the run left no metrics.json; see {scratch / f'{name}.log'}")
    rounds = json.loads(metrics.read_text())["rounds"]
    return {"rounds": rounds, "wall_s": wall, "processes": clientapps_started(logs) - before}


def report(name: str, result: dict) -> None:
    """Print a variant's table: per round wall time, processes and the clients' phases."""
    rounds = result["rounds"]
    print(f"\n{name}: {result['wall_s']:.0f} s for `flwr run` (ServerApp start included), "
          f"{result['processes']} flwr-clientapp processes ({result['processes'] / len(rounds):.1f} a round)")
    print("round | wall s | " + " | ".join(p.removesuffix("_s").removeprefix("time_") for p in PHASES))
    previous = 0.0
    for record in rounds:
        wall = record["elapsed_s"] - previous
        previous = record["elapsed_s"]
        phases = " | ".join(f"{record[p]:.1f}" if p in record else "-" for p in PHASES)
        print(f"{record['round']:5d} | {wall:6.1f} | {phases}")


def main(argv: list[str] | None = None) -> None:
    """Measure each variant on one local deployment."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="default: separate and on-receipt, and baseline first with --baseline")
    parser.add_argument("--baseline", type=Path, help="another checkout whose app the `baseline` variant runs")
    parser.add_argument("--run-config", default="", help="more `key=value` run settings for every variant")
    args = parser.parse_args(argv)
    variants = args.variants or (["baseline"] if args.baseline else []) + ["separate", "on-receipt"]
    if "baseline" in variants and not args.baseline:
        parser.error("the baseline variant needs --baseline DIR")

    scratch = Path(tempfile.mkdtemp(prefix="flowertune-deployment-bench-"))
    env = environment(scratch)
    folder = scratch / "local-deployment"
    print(f"{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; scratch {scratch}")
    print(deploy("up", folder, env, args.supernodes).strip())
    state = json.loads((folder / "deployment.json").read_text())
    logs = [Path(p["log"]) for p in state["processes"] if p["name"].startswith("supernode")]
    try:
        for name in variants:
            app = args.baseline.resolve() if name == "baseline" else REPO_ROOT
            run_config = f"num-server-rounds={args.rounds} {VARIANTS[name]} {args.run_config}".strip()
            print(f"\nflwr run {app} remote-deployment --run-config {shlex.quote(run_config)}", flush=True)
            report(name, run_variant(name, app, run_config, scratch, env, logs))
            print(f"load average now {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        print(deploy("down", folder, env, args.supernodes).strip())


if __name__ == "__main__":
    main()
