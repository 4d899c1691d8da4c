"""Run Flower's `examples/flowertune-llm` and this app side by side on the same job, and compare.

The job: the built-in tiny Llama, the built-in data (instruction and input merged into one field,
so both apps format the same words), 2 clients, 5 rounds of 10 steps, batch 16, 256 tokens, LoRA
r=16 / alpha=32 on every linear layer, learning rate 1e-2 -> 1e-3, no evaluation. Each app runs
with `flwr run <app> --stream` in simulation, in its own Python environment, with a private Flower
home and private ports; the local SuperLink is stopped by PID after each run. The two apps run
alternately, `--repeats` times each, so a load on the machine hits both alike.

    python benchmarks/reference_comparison.py --reference-app ~/anchor-ref --reference-python ~/anchor-venv/bin/python

The reference app is a copy of Flower's example with only the job's edits (local model path,
`FederatedDataset(dataset="json", data_files=...)`, the LoRA target list, the config values): it is
never part of this repository. Measured per run: Flower's "Strategy execution finished in" time,
each round's time (between Flower's "[ROUND k/N]" lines as they arrive), the time of the training
loop (transformers' `train_runtime`, as the client logs it), the peak resident memory of the client
processes (sampled with psutil) and the adapter bytes per round. It prints and writes JSON under
benchmarks/results/; it asserts nothing.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
BUILTIN_DATA = REPO_ROOT / "flowertune_llm" / "builtin" / "data" / "tiny_instructions.jsonl"
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# The job, in each app's own keys (`{model}` and `{data}` are filled in per run).
JOB = {"rounds": 5, "steps": 10, "batch": 16, "seq_length": 256, "lora_r": 16, "lora_alpha": 32,
       "lr_max": 1e-2, "lr_min": 1e-3, "clients": 2}


def reference_run_config(model: str, data: str, rounds: int) -> dict:
    """Return the run config of Flower's example for the job."""
    return {
        "num-server-rounds": rounds, "model.name": model, "dataset.name": data, "model.quantization": 4,
        "model.lora.peft-lora-r": JOB["lora_r"], "model.lora.peft-lora-alpha": JOB["lora_alpha"],
        "train.learning-rate-max": JOB["lr_max"], "train.learning-rate-min": JOB["lr_min"],
        "train.seq-length": JOB["seq_length"], "train.training-arguments.max-steps": JOB["steps"],
        "train.training-arguments.per-device-train-batch-size": JOB["batch"],
        "strategy.fraction-train": 1.0, "strategy.fraction-evaluate": 0.0,
    }


def our_run_config(model: str, data: str, rounds: int, results_dir: str, run_name: str) -> dict:
    """Return this app's run config for the job (evaluation off, every example trained on)."""
    return {
        "num-server-rounds": rounds, "model.name": model, "dataset.name": data, "model.quantization": 4,
        "model.lora.r": JOB["lora_r"], "model.lora.alpha": JOB["lora_alpha"], "model.lora.target-modules": LORA_TARGETS,
        "train.learning-rate-max": JOB["lr_max"], "train.learning-rate-min": JOB["lr_min"],
        "train.seq-length": JOB["seq_length"], "train.max-steps": JOB["steps"], "train.batch-size": JOB["batch"],
        "strategy.fraction-train": 1.0, "strategy.fraction-evaluate": 0.0, "dataset.validation-fraction": 0.0,
        "evaluate.exact-match-examples": 0, "results.dir": results_dir, "results.run-name": run_name,
    }


def to_run_config_arg(config: dict) -> str:
    """Return `config` as the `--run-config "k=v ..."` string of `flwr run` (strings TOML-quoted)."""
    def value(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return str(v).lower()
        return repr(v)
    return " ".join(f"{key}={value(v)}" for key, v in config.items())


def merged_record(record: dict) -> dict:
    """Return a built-in record with its input merged into the instruction (the only prompt field)."""
    instruction, context = record["instruction"], record.get("input") or ""
    return {"instruction": f"{instruction}\n{context}" if context.strip() else instruction, "output": record["output"]}


def write_job_data(target: Path, source: Path = BUILTIN_DATA) -> int:
    """Write the job's data as JSON lines (instruction, output); return the number of records."""
    lines = [json.dumps(merged_record(json.loads(line))) for line in source.read_text().splitlines() if line.strip()]
    target.write_text("\n".join(lines) + "\n")
    return len(lines)


def compatible_checkpoint(source: Path, target: Path) -> Path:
    """Copy a checkpoint folder so that transformers 4 reads it too; return the copy.

    transformers 5 names the tokenizer class `TokenizersBackend`, which transformers 4.53 (the
    example's pin) does not know; for a `tokenizer.json` tokenizer it is `PreTrainedTokenizerFast`
    there. Weights, config and vocabulary are the same files, so both apps load the same model.
    """
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "tokenizer_config.json":
            (target / item.name).write_bytes(item.read_bytes())
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    tokenizer_config.pop("backend", None)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return target


@dataclass
class RunLog:
    """What a run's streamed log says, each line timed on arrival."""

    strategy_s: float | None = None
    round_s: list[float] = field(default_factory=list)
    train_runtime_s: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)


STRATEGY_DONE = re.compile(r"Strategy execution finished in ([0-9.]+)\s*s")
ROUND_START = re.compile(r"\[ROUND (\d+)/(\d+)\]")
# transformers' end-of-training log, printed by its progress callback: {'train_runtime': 0.57, ...}
TRAIN_SUMMARY = re.compile(r"(\{'train_runtime'.*?\})")


def parse_log(timed_lines: list[tuple[float, str]]) -> RunLog:
    """Return the strategy time, round times and training-loop times found in a run's timed log lines.

    A round's time runs from its "[ROUND k/N]" line to the next one, and the last round's to the
    "Strategy execution finished" line.
    """
    log, starts, finished = RunLog(), [], None
    for arrived, line in timed_lines:
        if match := STRATEGY_DONE.search(line):
            log.strategy_s, finished = float(match.group(1)), arrived
        elif match := ROUND_START.search(line):
            starts.append(arrived)
        elif match := TRAIN_SUMMARY.search(line):
            summary = ast.literal_eval(match.group(1))
            log.train_runtime_s.append(float(summary["train_runtime"]))
            log.train_loss.append(float(summary.get("train_loss", "nan")))
    ends = starts[1:] + ([finished] if finished is not None else [])
    log.round_s = [round(end - start, 3) for start, end in zip(starts, ends)]
    return log


def free_port() -> int:
    """Return a loopback TCP port that is free now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environ_has(process: psutil.Process, marker: str) -> bool:
    try:
        return process.environ().get("FLWR_HOME") == marker
    except (psutil.Error, OSError):
        return False


def home_processes(flwr_home: Path) -> list[psutil.Process]:
    """Return the processes started under this Flower home (every one inherits its FLWR_HOME)."""
    return [p for p in psutil.process_iter() if _environ_has(p, str(flwr_home))]


def is_client(command: str) -> bool:
    """Return whether a process of the run is a ClientApp worker (a Ray actor of Flower's simulation)."""
    return "ClientAppActor" in command


class MemorySampler(threading.Thread):
    """Sample the RSS of a Flower home's processes every `interval` s; keep each process's peak."""

    def __init__(self, flwr_home: Path, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.flwr_home, self.interval = flwr_home, interval
        self.peaks: dict[int, dict] = {}
        self.peak_client_total_mb = 0.0
        self.stopping = threading.Event()
        self._known: dict[int, psutil.Process] = {}
        self._last_scan = 0.0

    def run(self) -> None:
        """Sample until stopped."""
        while not self.stopping.wait(self.interval):
            if time.monotonic() - self._last_scan > 1.0:
                for process in home_processes(self.flwr_home):
                    self._known.setdefault(process.pid, process)
                self._last_scan = time.monotonic()
            client_total = 0.0
            for pid, process in list(self._known.items()):
                try:
                    rss = process.memory_info().rss / 2**20
                    command = " ".join(process.cmdline()) or process.name()
                except psutil.Error:
                    self._known.pop(pid)
                    continue
                peak = self.peaks.setdefault(pid, {"command": command, "peak_rss_mb": 0.0})
                peak["command"] = command if is_client(command) else peak["command"]
                peak["peak_rss_mb"] = max(peak["peak_rss_mb"], round(rss, 1))
                if is_client(command):
                    client_total += rss
            self.peak_client_total_mb = max(self.peak_client_total_mb, round(client_total, 1))

    def client_peaks(self) -> list[float]:
        """Return the peak RSS (MB) of each client process seen."""
        return sorted((p["peak_rss_mb"] for p in self.peaks.values() if is_client(p["command"])), reverse=True)


def stop_home(flwr_home: Path) -> None:
    """Stop, by PID, every process left under this Flower home (the local SuperLink and the run's)."""
    processes = home_processes(flwr_home)
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=15)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass


def run_app(app: Path, python: Path, run_config: dict, flwr_home: Path, cwd: Path, timeout: float) -> dict:
    """Run `flwr run <app> --stream` with `python`'s Flower; return the log's figures and the client peaks."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    bin_dir = python.parent
    env = {**os.environ, "FLWR_HOME": str(flwr_home),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("VIRTUAL_ENV", None)
    command = [str(bin_dir / "flwr"), "run", str(app), "--stream", "--run-config", to_run_config_arg(run_config),
               "--federation-config", f"num-supernodes={JOB['clients']}"]
    sampler = MemorySampler(flwr_home)
    sampler.start()
    timed_lines: list[tuple[float, str]] = []
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            timed_lines.append((time.monotonic(), line.rstrip("\n")))
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{app} ran over {timeout} s")
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        sampler.stopping.set()
        sampler.join()
        stop_home(flwr_home)
    log = parse_log(timed_lines)
    (flwr_home / "run.log").write_text("\n".join(f"{t - started:8.2f} {line}" for t, line in timed_lines) + "\n")
    clients = sampler.client_peaks()
    return {**asdict(log), "wall_s": round(time.monotonic() - started, 2), "returncode": process.returncode,
            "client_peak_rss_mb": clients, "peak_client_rss_mb": max(clients, default=float("nan")),
            "peak_clients_total_rss_mb": sampler.peak_client_total_mb, "log": str(flwr_home / "run.log")}


def reference_bytes_per_round(model: str, clients: int) -> int:
    """Return the bytes of a round of Flower's example: its float32 adapter, to and from each client.

    Computed, not measured: the example sends `ArrayRecord(get_peft_model_state_dict(model))`, the
    float32 LoRA weights, both ways; the same adapter structure is built here on a weightless base.
    """
    import torch
    from flwr.app import ArrayRecord
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    adapter = get_peft_model(base, LoraConfig(r=JOB["lora_r"], lora_alpha=JOB["lora_alpha"],
                                              target_modules=LORA_TARGETS.split(","), task_type="CAUSAL_LM"))
    state = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in get_peft_model_state_dict(adapter).items()}
    return 2 * clients * ArrayRecord(state).count_bytes()


def our_round_figures(metrics_file: Path) -> dict:
    """Return the per-round figures our app recorded itself (metrics.json): bytes, client phase times."""
    rounds = json.loads(metrics_file.read_text())["rounds"]
    return {
        "bytes_per_round": [r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rounds],
        "client_time_train_s": [r.get("time_train_s") for r in rounds],
        "client_time_train_loop_s": [r.get("time_train_loop_s") for r in rounds],
        "client_peak_rss_mb_self": [r.get("peak_rss_mb") for r in rounds],
        "train_loss": [r.get("train_loss") for r in rounds],
    }


def median(values: list[float]) -> float:
    """Return the median of the finite values, or nan."""
    finite = [v for v in values if v is not None and v == v]
    return statistics.median(finite) if finite else float("nan")


def summary(runs: list[dict], bytes_per_round: float) -> dict:
    """Return one app's figures: medians over its runs (rounds 2+ for round and training times)."""
    return {
        "strategy_s": median([r["strategy_s"] for r in runs]),
        "round_s_after_first": median([s for r in runs for s in r["round_s"][1:]]),
        "round_1_s": median([r["round_s"][0] for r in runs if r["round_s"]]),
        "train_loop_s": median([s for r in runs for s in r["train_loop_s_after_first"]]),
        "peak_client_rss_mb": median([r["peak_client_rss_mb"] for r in runs]),
        "bytes_per_round": bytes_per_round,
    }


ROWS = (("Strategy execution (s)", "strategy_s", "{:.1f}"), ("round 1 (s)", "round_1_s", "{:.2f}"),
        ("round, rounds 2+ (s)", "round_s_after_first", "{:.2f}"),
        ("training loop per client-round, rounds 2+ (s)", "train_loop_s", "{:.3f}"),
        ("peak client RSS (MB)", "peak_client_rss_mb", "{:,.0f}"), ("bytes per round", "bytes_per_round", "{:,.0f}"))


def table(reference: dict, ours: dict) -> str:
    """Return the side-by-side table (Markdown) with the ratio ours / reference."""
    lines = ["| | Flower's example | this app | this app / example |", "|---|---|---|---|"]
    for label, key, fmt in ROWS:
        ratio = ours[key] / reference[key] if reference[key] else float("nan")
        lines.append(f"| {label} | {fmt.format(reference[key])} | {fmt.format(ours[key])} | {ratio:.2f}x |")
    return "\n".join(lines)


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-app", type=Path, required=True, help="folder of the edited copy of Flower's example")
    parser.add_argument("--reference-python", type=Path, required=True, help="python of the example's environment")
    parser.add_argument("--python", type=Path, default=Path(sys.executable), help="python of this app's environment")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each app, alternating")
    parser.add_argument("--rounds", type=int, default=JOB["rounds"])
    parser.add_argument("--run-config", default="", help='extra settings for this app only: "key=value ..."')
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--label", default="reference", help="suffix of the JSON file's name")
    parser.add_argument("--logs", type=Path, default=None, help="keep each run's timed log in this folder")
    args = parser.parse_args(argv)
    for option, path in (("--reference-app", args.reference_app / "pyproject.toml"),
                         ("--reference-python", args.reference_python), ("--python", args.python)):
        if not path.exists():
            parser.error(f"{option}: no such file {path}")
    if args.repeats < 1 or args.rounds < 2:
        parser.error("--repeats must be >= 1 and --rounds >= 2")

    from flwr.common.config import parse_config_args

    from flowertune_llm.builtin.models import ensure_builtin_model

    extra = parse_config_args([args.run_config]) if args.run_config else {}
    builtin = ensure_builtin_model("builtin:tiny-llama")
    report = {"job": JOB | {"rounds": args.rounds}, "our_extra_run_config": extra,
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": {"python": platform.python_version(),
              "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
              "runs": {"reference": [], "ours": []}}
    with tempfile.TemporaryDirectory(prefix="flowertune-anchor-") as scratch:
        scratch = Path(scratch)
        data = scratch / "job-data.jsonl"
        report["records"] = write_job_data(data)
        model = str(compatible_checkpoint(builtin, scratch / "tiny-llama"))
        report["model"] = str(builtin)
        for repeat in range(args.repeats):
            for name in ("reference", "ours"):
                home = scratch / f"flwr-home-{name}-{repeat}"
                if name == "reference":
                    app, python = args.reference_app.resolve(), args.reference_python
                    config = reference_run_config(model, str(data), args.rounds)
                else:
                    app, python = REPO_ROOT, args.python
                    config = our_run_config(model, str(data), args.rounds, str(scratch / "results"), f"ours-{repeat}")
                    config.update(extra)
                load_before = load_average()
                result = run_app(app, python, config, home, scratch, args.timeout)
                result |= {"load_before": load_before, "load_after": load_average()}
                if args.logs:
                    args.logs.mkdir(parents=True, exist_ok=True)
                    result["log"] = str(args.logs / f"{name}-{repeat}.log")
                    Path(result["log"]).write_bytes((home / "run.log").read_bytes())
                if name == "ours":
                    metrics_file = scratch / "results" / f"ours-{repeat}" / "metrics.json"
                    if metrics_file.is_file():
                        result |= our_round_figures(metrics_file)
                report["runs"][name].append(result)
                loops = result.get("client_time_train_loop_s") or result["train_runtime_s"]
                print(f"{name} run {repeat + 1}: strategy {result['strategy_s']} s, rounds {result['round_s']}, "
                      f"training loop {loops}, peak client RSS {result['peak_client_rss_mb']} MB, "
                      f"load {load_before} -> {result['load_after']}", flush=True)
                if result["strategy_s"] is None:
                    print(f"  {name} did not finish (rc {result['returncode']}); its log:\n"
                          + Path(result["log"]).read_text()[-3000:], flush=True)
        reference_bytes = reference_bytes_per_round(model, JOB["clients"])
        our_bytes = median([b for r in report["runs"]["ours"] for b in r.get("bytes_per_round", [])])
    # Our client prints no train_runtime line (its printer is off) but reports the same figure,
    # averaged over the round's clients; the example's lines are one per client, round 1's first.
    for run in report["runs"]["reference"]:
        run["train_loop_s_after_first"] = run["train_runtime_s"][JOB["clients"]:]
    for run in report["runs"]["ours"]:
        run["train_loop_s_after_first"] = [s for s in run.get("client_time_train_loop_s", [])[1:] if s]
    report["summary"] = {"reference": summary(report["runs"]["reference"], reference_bytes),
                         "ours": summary(report["runs"]["ours"], our_bytes)}
    text = table(report["summary"]["reference"], report["summary"]["ours"])
    report["table"] = text
    print("\n" + text)
    print(f"\nMedians of {args.repeats} run(s) each; load average {report['runs']['reference'][0]['load_before']} "
          f"at the start, {load_average()} at the end. Reference bytes are computed (float32 adapter both ways).")
    args.output.mkdir(parents=True, exist_ok=True)
    target = args.output / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.label}.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Wrote {target}  (reproduce: python benchmarks/reference_comparison.py "
          f"{shlex.join(sys.argv[1:] if argv is None else argv)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
