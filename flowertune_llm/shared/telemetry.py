"""What a client measures about its own round: time per phase and peak memory, sent as metrics.

The numbers travel in the reply's MetricRecord (averaged over clients like the loss) and land in
metrics.json, so every run is also a profile; `benchmarks/round_benchmark.py` reads them.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Wall-clock seconds per named phase of a client's round."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase `name` (metric `time-<name>-s`)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def metrics(self) -> dict[str, float]:
        """Return the phase times as metric names and values."""
        return {f"time-{name}-s": round(value, 4) for name, value in self.seconds.items()}


def _high_water_rss_bytes() -> int:
    """Return the process's resident-memory high-water mark (VmHWM, resettable on Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def reset_peak_memory() -> None:
    """Start this message's peaks from now: CUDA's peak counters, and the RSS high-water mark on Linux.

    A simulation actor serves many messages (and virtual nodes); without a reset each reply would
    carry the maximum over the model build, earlier rounds and other nodes.
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        # "5" resets VmHWM to the current RSS (Linux >= 4.0); elsewhere the peak stays cumulative.
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def peak_memory_metrics() -> dict[str, float]:
    """Return this process's peak resident memory and peak GPU memory (allocated, reserved; 0 on CPU), in MB.

    The GPU keys are there on a CPU too: replies averaged together must share their metric names.
    Reserved is what the caching allocator holds from the GPU, the figure that runs out first.
    """
    on_gpu = torch.cuda.is_available()
    return {
        "peak-rss-mb": round(_high_water_rss_bytes() / 2**20, 1),
        "peak-gpu-allocated-mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else 0.0,
        "peak-gpu-reserved-mb": round(torch.cuda.max_memory_reserved() / 2**20, 1) if on_gpu else 0.0,
    }
