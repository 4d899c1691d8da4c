"""Which device a process trains on, and what a GPU process must check before its first model.

CPU is the default everywhere: a process trains on CUDA only when CUDA shows it a GPU. Ray shows
an actor that asked for 0 GPUs none at all (`CUDA_VISIBLE_DEVICES=""`), so a simulation without
`client-resources-num-gpus` trains on CPU even on a GPU machine; each reply therefore says which
device it trained on (`trained-on-gpu`, metrics.json `device`), and `train.expect-gpu` turns a CPU
client into a warning in the round line or a stop. The checks below read `torch.cuda` at call time,
so tests can stand in a fake GPU for each decision.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.common.logger import log

from flowertune_llm.shared.settings import TrainSettings

# The chunk size the fused loss falls back to: the memory report's chunked-loss figure (1024 tokens'
# logits at a time: 128 MB of fp32 logits for a 32k vocabulary).
FALLBACK_CHUNK_TOKENS = 1024
# What a round's `device` says when some of its clients trained on a GPU and some on the CPU.
MIXED = "mixed"


class DeviceError(RuntimeError):
    """This process cannot train on the device it was given, as configured."""


@dataclass(frozen=True)
class TrainingDevice:
    """The device this process trains on: `cuda` (its first visible GPU) or `cpu`."""

    kind: str
    name: str
    capability: tuple[int, int] | None = None

    @property
    def on_gpu(self) -> bool:
        """Return whether training runs on a CUDA GPU."""
        return self.kind == "cuda"

    def describe(self) -> str:
        """Return the device in words, for log lines and error messages."""
        if not self.on_gpu:
            return "cpu"
        major, minor = self.capability or (0, 0)
        return f"cuda:0 ({self.name}, compute capability {major}.{minor})"


# bf16 keeps fp32's range, so 4/8-bit matmuls need no loss scaling; it also runs on CPUs. Frozen
# 16-bit weights (a bf16 base, the lean embedding and LM head) and generation use it everywhere.
COMPUTE_DTYPE = torch.bfloat16


def training_compute_dtype() -> torch.dtype:
    """Return what a quantized base computes in while training: bf16 on a GPU, float32 on a CPU.

    On a CPU bf16 made training slower, not faster. Measured on the tiny Llama (batch 16, 2026-12-06,
    docs/performance.md): PyTorch's bf16 attention backward on CPU took 10x its float32 time, and
    autocast added a cast around every matmul; a step took 0.99 s in bf16 and 0.43 s in float32.
    Only activations change: 4-bit weights stay 4-bit, the frozen embedding and LM head stay bf16,
    the LoRA weights float32 as before.
    """
    return COMPUTE_DTYPE if torch.cuda.is_available() else torch.float32


def training_device() -> TrainingDevice:
    """Return the device a model built in this process lands on (`model.default_device_map`)."""
    if not torch.cuda.is_available():
        return TrainingDevice("cpu", "cpu")
    index = torch.cuda.current_device()
    return TrainingDevice("cuda", torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Return the GPU ids this process may use: CUDA_VISIBLE_DEVICES' list, else every GPU torch counts."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    # NVML-based: counting does not initialise CUDA, so a child's pin can still follow.
    return [str(index) for index in range(torch.cuda.device_count())]


def one_gpu_environment(environ: Mapping[str, str], gpu: str | None) -> dict[str, str]:
    """Return `environ` for a child process that may see GPU `gpu` only (None: leave it as it is)."""
    # CUDA reads the variable once, when the child initialises it: it must be set before the start.
    return {**environ, "CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else dict(environ)


def gpus_for_processes(count: int, gpus: list[str]) -> list[str | None]:
    """Return the GPU of each of `count` processes, round robin over `gpus` (None each when there is none)."""
    return [gpus[index % len(gpus)] if gpus else None for index in range(count)]


def check_one_gpu() -> None:
    """Raise when this process sees more than one GPU: trl's trainer then refuses to train.

    transformers' Trainer counts every visible GPU (`n_gpu`) and trl 1.16 raises for `n_gpu > 1`
    when the model sits on one device; the model would be built first, which on a 7B base takes
    minutes. By the time a handler runs, bitsandbytes' import has initialised CUDA, so the process
    can no longer narrow its own view: whoever starts it has to.
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count > 1:
        raise DeviceError(
            f"this process sees {count} GPUs (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            "trl trains a quantized model on one GPU per process. Start each SuperNode with one GPU "
            "(`CUDA_VISIBLE_DEVICES=0 flower-supernode ...`; the local deployment launcher does this), and "
            "in simulation give each ClientApp at most one (client-resources-num-gpus <= 1). Training on several "
            "GPUs per client (train.num-devices / the node's num-devices > 1) runs in worker processes, but "
            "evaluation does not yet: there set strategy.fraction-evaluate = 0 and evaluate.on-receipt = false "
            "(evaluate.server-dataset evaluates on the server instead)"
        )


def check_bf16(device: TrainingDevice) -> None:
    """Raise on a GPU without native bfloat16 (compute capability below 8.0: T4, V100).

    The app computes in bf16 (the 4-bit compute dtype, the trainer's autocast). torch reports bf16
    as supported on such GPUs by emulating it, so transformers does not object: training would run
    on emulated bf16 matmuls, many times slower, with nothing said.
    """
    if device.on_gpu and device.capability is not None and device.capability[0] < 8:
        major, minor = device.capability
        raise DeviceError(
            f"{device.name} (compute capability {major}.{minor}) has no native bfloat16, which the app "
            "computes in (4-bit compute dtype, bf16 autocast); torch would emulate it, many times slower. "
            "Use a GPU of compute capability 8.0 or newer (A100, A10, L4, RTX 30xx/40xx, H100), or train on "
            "the CPU (client-resources-num-gpus = 0)"
        )


def check_expected_gpu(device: TrainingDevice, expect_gpu: str) -> None:
    """Raise before any model is built when `train.expect-gpu='stop'` and this client has no GPU."""
    if expect_gpu == "stop" and not device.on_gpu:
        raise DeviceError(
            "train.expect-gpu='stop': this client sees no CUDA GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). In simulation Ray hides every GPU "
            "from ClientApps that ask for none: run with a GPU federation (e.g. --federation-config "
            "federations/reference-gpu.toml, or client-resources-num-gpus > 0); or set train.expect-gpu='off'"
        )


def ray_gpu_share() -> float | None:
    """Return the GPU share Ray gave this process's actor (e.g. 0.5), or None outside Ray or without one."""
    ray = sys.modules.get("ray")  # imported by Flower's Ray backend in its actors; never imported here
    if ray is None or not ray.is_initialized():
        return None
    share = ray.get_runtime_context().get_assigned_resources().get("GPU")
    return float(share) if share else None


@functools.lru_cache(maxsize=1)
def cap_memory_to_ray_share() -> float | None:
    """Limit this process's CUDA allocator to its Ray GPU share (once per process); return the share set.

    Ray divides a GPU's share, not its memory: two actors at 0.5 each would both grow until one
    runs out. With the cap, an actor that outgrows its half fails with its own out-of-memory error
    instead of taking the other's. A share of 1 or more needs no cap.
    """
    share = ray_gpu_share()
    if share is None or share >= 1 or not torch.cuda.is_available():
        return None
    torch.cuda.set_per_process_memory_fraction(share, torch.cuda.current_device())
    log(INFO, "GPU memory of this process capped at %.0f%% (its Ray GPU share)", share * 100)
    return share


@functools.lru_cache(maxsize=4)
def fused_loss_problem(device: str) -> str | None:
    """Return why trl's fused loss cannot run on `device` (its Triton kernels do not compile), or None.

    trl 1.16 computes the loss with Triton kernels on a CUDA GPU where Triton is installed; Triton
    compiles them in every new process with the system's C compiler and Python headers. Without
    those, training crashes at step 1. One tiny forward and backward through the same function
    finds out once per process (on a CPU it runs trl's torch tiles, which need no compiler).
    """
    from trl.kernels import ChunkedLogProbFunction

    try:
        hidden = torch.randn(8, 16, device=device, requires_grad=True)
        weight = torch.randn(64, 16, device=device)
        targets = torch.randint(0, 64, (8,), device=device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            logprobs = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64, None, 1.0, ())[0]
        logprobs.sum().backward()
    except Exception as error:  # Triton's compile errors have no common base class
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return None


def loss_settings(settings: TrainSettings, device: TrainingDevice) -> TrainSettings:
    """Return `settings` with the chunked loss in place of trl's fused one on a CPU, or where the fused one cannot run.

    On a CPU trl's fused LM head runs torch tiles that fold each tile with several fp32 temporaries,
    and scores entropy and top-1 for its logs: the loss head alone (1,100 tokens, a 1,024 vocabulary,
    forward and backward) took 80-160 ms there against 23-49 ms for the chunked loss, and it held
    more memory than the full logits (2026-12-06, docs/performance.md). Same loss, same gradients.
    """
    if settings.loss_chunk_tokens:
        return settings
    if not device.on_gpu:
        return dataclasses.replace(settings, loss_chunk_tokens=FALLBACK_CHUNK_TOKENS)
    problem = fused_loss_problem("cuda")
    if problem is None:
        return settings
    log(WARNING, "trl's fused loss does not run on this GPU (%s: Triton needs a C compiler and Python "
        "headers); computing the loss %d tokens at a time instead (train.loss-chunk-tokens=%d), which "
        "gives the same loss", problem, FALLBACK_CHUNK_TOKENS, FALLBACK_CHUNK_TOKENS)
    return dataclasses.replace(settings, loss_chunk_tokens=FALLBACK_CHUNK_TOKENS)


@functools.lru_cache(maxsize=1)
def _log_device_once(description: str) -> None:
    log(INFO, "This ClientApp trains on %s", description)


def prepare_client_device(expect_gpu: str, num_devices: int = 1) -> TrainingDevice:
    """Check this client's device as configured, cap its GPU memory to its Ray share, and return it.

    With `num_devices` > 1 the client trains in one worker process per GPU (client/multi_device.py),
    so it may see several.
    """
    device = training_device()
    check_expected_gpu(device, expect_gpu)
    if num_devices == 1:
        check_one_gpu()
    check_bf16(device)
    cap_memory_to_ray_share()
    _log_device_once(device.describe())
    return device


# --- The server's view: which device a round's clients trained on ----------------------------------


def round_device(trained_on_gpu: float | None) -> str | None:
    """Return a round's `device` from its clients' mean `trained-on-gpu`: cuda, cpu, mixed (None: no replies)."""
    if trained_on_gpu is None:
        return None
    if trained_on_gpu >= 1.0:
        return "cuda"
    return "cpu" if trained_on_gpu <= 0.0 else MIXED


def expected_gpu_note(expect_gpu: str, device: str | None) -> str | None:
    """Return the round line's warning when GPU training was expected and clients trained on CPU, else None."""
    if expect_gpu == "off" or device in (None, "cuda"):
        return None
    who = "all clients" if device == "cpu" else "some clients"
    return (f"WARNING: train.expect-gpu is set but {who} trained on CPU (in simulation give ClientApps "
            "GPUs: client-resources-num-gpus > 0)")


def check_round_device(expect_gpu: str, run_round: int, device: str | None) -> None:
    """Stop the run after a round in which no client trained on a GPU, when `train.expect-gpu='stop'`."""
    if expect_gpu == "stop" and device != "cuda":
        seen = device or "no valid replies: the clients' errors are logged above"
        raise DeviceError(
            f"train.expect-gpu='stop': in round {run_round} not every client trained on a GPU "
            f"(device: {seen}); stopping the run"
        )
