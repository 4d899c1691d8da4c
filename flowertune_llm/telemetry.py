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


def peak_memory_metrics() -> dict[str, float]:
    """Return this process's peak resident memory (and peak GPU memory where there is a GPU), in MB."""
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
    metrics = {"peak-rss-mb": round(rss_bytes / 2**20, 1)}
    if torch.cuda.is_available():
        metrics["peak-gpu-mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return metrics
