"""One client's local training on several devices: data-parallel (DDP) over `train.num-devices` processes.

The client process (a Ray actor in simulation, a `flwr-clientapp` process in a deployment) does not
train itself: `train_on_devices` writes the job into a temporary folder (the run's settings as this
node applies them, the received global adapter, the round's learning rate, seed and proximal mu,
and the node's training data) and starts
    python -m torch.distributed.run --standalone --nproc-per-node N -m flowertune_llm.client.multi_device JOB
in a session of its own. Each of the N workers builds its own quantized replica of the base with
the global adapter (on cuda:LOCAL_RANK, or the CPU), and trains it with the same trl trainer as one
device does; transformers' Trainer sees the distributed environment torchrun sets and wraps the
PeftModel in DDP, which all-reduces the gradients of the trainable (LoRA) weights only. Each worker
takes `batch-size / N` examples of every micro-batch (accelerate shards the one seeded order), so a
step trains on the same examples as one device with `batch-size` (docs/multi-device.md says what
differs). Rank 0 writes the trained adapter, the loss and the tokens back; the client replies with
them as the one-device path does.

A worker that raises or dies fails the round: torchrun stops the others, and the client raises
with the failing worker's traceback. The whole session is killed when the client gives up
(`strategy.round-timeout`: a later reply would be dropped anyway) or fails, so no worker outlives it;
a client process that dies outright takes torchrun (and so its workers) with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk
from peft import PeftModel
from safetensors.torch import load_file, save_file

from flowertune_llm.client.kept_model import kept_tokenizer, peft_model
from flowertune_llm.client.model import build_peft_model, load_tokenizer
from flowertune_llm.client.training import LocalTraining, train_adapter
from flowertune_llm.shared.adapters import adapter_state, load_adapter_state
from flowertune_llm.shared.devices import TrainingDevice, loss_settings, training_device
from flowertune_llm.shared.settings import AppConfig, parse_config, to_run_config
from flowertune_llm.shared.telemetry import PhaseTimer

# The job folder's files: what the client writes, what rank 0 writes back, what a failing worker leaves.
_RUN_CONFIG, _ROUND, _RECEIVED, _DATA = "run-config.json", "round.json", "received.safetensors", "train-data"
_TRAINED, _OUTCOME, _LOG = "trained.safetensors", "outcome.json", "workers.log"
_ERROR = "error-rank-{rank}.txt"


class MultiDeviceError(RuntimeError):
    """Training on several devices failed: a worker raised or died, or the round's deadline passed."""


@dataclass(frozen=True)
class RoundJob:
    """What one round of local training needs besides the model settings and data."""

    learning_rate: float
    seed: int
    proximal_mu: float = 0.0


def train_received_adapter(
    config: AppConfig, train_data: Dataset, received: dict[str, torch.Tensor], job: RoundJob, device: TrainingDevice,
    timer: PhaseTimer, model: PeftModel | None = None,
) -> tuple[dict[str, torch.Tensor], LocalTraining]:
    """Train the received global adapter on this node's data: here on one device, in worker processes on several.

    `model`, if given, already holds the received adapter (it was just evaluated) and is trained on
    one device instead of building another. Returns the trained adapter (float32) and the outcome;
    the timer gets the phases it took.
    """
    if config.train.num_devices > 1:
        with timer.phase("train"):
            return train_on_devices(config, train_data, received, job, timeout_s=config.strategy.round_timeout)
    if model is None:
        with timer.phase("base"):
            model = peft_model(config.model, reuse=config.model.reuse_base)
        with timer.phase("adapter-load"):
            load_adapter_state(model, received)
    with timer.phase("train"):
        outcome = train_adapter(model, kept_tokenizer(config.model), train_data, loss_settings(config.train, device),
                                job.learning_rate, job.seed, job.proximal_mu)
    return adapter_state(model), outcome


def check_devices(num_devices: int) -> None:
    """Raise unless this process can give each of `num_devices` workers a device of its own."""
    if num_devices > 1 and torch.cuda.is_available() and torch.cuda.device_count() < num_devices:
        raise MultiDeviceError(
            f"train.num-devices (or the node's num-devices) = {num_devices}, but this client sees "
            f"{torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
            "one GPU per device is needed (in simulation, client-resources-num-gpus = num-devices)"
        )


def _worker_environment(num_devices: int) -> dict[str, str]:
    """Return the workers' environment: the client's, with the CPU threads shared out on a CPU."""
    environment = dict(os.environ)
    if not torch.cuda.is_available():
        # N processes with a thread per core each would oversubscribe the cores N times.
        threads = max(1, (os.cpu_count() or 1) // num_devices)
        environment.setdefault("OMP_NUM_THREADS", str(threads))
    # The workers import this package from where this process did: a `flwr-clientapp` puts the
    # app's folder on sys.path, not in the environment.
    package_root = str(Path(__file__).resolve().parents[2])
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, environment.get("PYTHONPATH")]))
    return environment


def _stop_with_parent() -> None:
    """In the child before torchrun starts: SIGTERM it when the client process dies (Linux; elsewhere nothing).

    A client killed outright (Ray stopping an actor, a SuperNode killed) cannot kill the session
    itself; torchrun stops its workers on SIGTERM.
    """
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _kill_session(process: subprocess.Popen) -> None:
    """Kill every process of the workers' session (torchrun and its workers), whatever state they are in."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _failure(job: Path, num_devices: int, returncode: int | None) -> str:
    """Return the workers' failure in words: the first failing worker's traceback, and torchrun's summary.

    torchrun's summary (the end of the log) names a worker killed by a signal, which leaves no traceback.
    """
    log = (job / _LOG).read_text(errors="replace") if (job / _LOG).is_file() else ""
    summary = f"torchrun exited with code {returncode}; the workers' log ends:\n{log[-1500:].strip()}"
    for rank in range(num_devices):
        error = job / _ERROR.format(rank=rank)
        if error.is_file():
            return f"worker {rank} of {num_devices} failed:\n{error.read_text().strip()}\n{summary}"
    return f"no worker left a traceback (killed?); {summary}"


def train_on_devices(
    config: AppConfig, train_data: Dataset, received: dict[str, torch.Tensor], job: RoundJob, timeout_s: float
) -> tuple[dict[str, torch.Tensor], LocalTraining]:
    """Train the received adapter on `config.train.num_devices` devices; return the trained adapter and outcome."""
    num_devices = config.train.num_devices
    check_devices(num_devices)
    with tempfile.TemporaryDirectory(prefix="flowertune-devices-") as folder:
        path = Path(folder)
        (path / _RUN_CONFIG).write_text(json.dumps(to_run_config(config)))
        (path / _ROUND).write_text(json.dumps(dataclasses.asdict(job)))
        save_file({name: tensor.contiguous() for name, tensor in received.items()}, str(path / _RECEIVED))
        train_data.save_to_disk(str(path / _DATA))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_devices}",
                   "-m", __name__, str(path)]
        with open(path / _LOG, "wb") as log:
            # A session of its own, so that one signal reaches torchrun and every worker.
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=_worker_environment(num_devices), start_new_session=True,
                                       preexec_fn=_stop_with_parent)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise MultiDeviceError(
                    f"training on {num_devices} devices did not finish within strategy.round-timeout={timeout_s:g} s "
                    "(the server drops a later reply); the workers were stopped"
                ) from None
            finally:
                _kill_session(process)
        if process.returncode != 0 or not (path / _OUTCOME).is_file():
            raise MultiDeviceError(f"training on {num_devices} devices failed: "
                                   + _failure(path, num_devices, process.returncode))
        outcome = json.loads((path / _OUTCOME).read_text())
        return load_file(str(path / _TRAINED)), LocalTraining(**outcome)


# --- A worker: one process of the `torch.distributed.run` launch ----------------------------------


def _train_worker(path: Path) -> None:
    """Train this rank's replica; rank 0 writes the trained adapter and the outcome."""
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        # Before any model exists: the model's device map and the trainer's device follow it.
        torch.cuda.set_device(local_rank)
    config = parse_config(json.loads((path / _RUN_CONFIG).read_text()))
    job = RoundJob(**json.loads((path / _ROUND).read_text()))
    device = training_device()
    # The chunked loss calls the backbone past DDP's forward, so workers keep trl's fused loss: on a
    # CPU too, where one process would take the (faster) chunked one (devices.loss_settings).
    settings = loss_settings(config.train, device) if device.on_gpu else config.train
    if settings.loss_chunk_tokens:
        raise MultiDeviceError(
            "trl's fused loss does not run on this GPU (Triton needs a C compiler and Python headers) and its "
            "chunked fallback cannot run data-parallel: install a C compiler, or train on one device"
        )
    model = build_peft_model(config.model)
    load_adapter_state(model, load_file(str(path / _RECEIVED)))
    outcome = train_adapter(model, load_tokenizer(config.model), load_from_disk(str(path / _DATA), keep_in_memory=True), settings,
                            learning_rate=job.learning_rate, seed=job.seed, proximal_mu=job.proximal_mu)
    if rank == 0:
        # The outcome last: the client reads the adapter only when the outcome is there.
        save_file({name: tensor.contiguous() for name, tensor in adapter_state(model).items()}, str(path / _TRAINED))
        (path / _OUTCOME).write_text(json.dumps(dataclasses.asdict(outcome)))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run one worker on the job folder named in `argv`; a failure leaves its traceback there."""
    path = Path((argv if argv is not None else sys.argv[1:])[0])
    try:
        _train_worker(path)
    except BaseException:
        (path / _ERROR.format(rank=os.environ.get("RANK", "0"))).write_text(traceback.format_exc())
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
