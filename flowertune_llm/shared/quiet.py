"""Silence library messages that mean nothing to a user of this app, each one at its source.

Each filter names the library module and the message, so every other warning still shows: no
blanket filter. What is silenced, and why a user can do nothing about it:
  - bitsandbytes on a CPU with AVX512-BF16 logs that the optional `kernels` package (a speed-up
    fetched from the Hugging Face hub) is missing; the built-in CPU kernel is used instead.
  - torch warns that `torch.jit.script_method` is deprecated when torch's own modules use it.
  - transformers warns that `is_gradient_checkpointing` is deprecated when peft and trl read it.
  - Ray warns of a future change in how it sets CUDA_VISIBLE_DEVICES for 0-GPU actors; Flower
    starts those actors, and the app sets devices per client itself.
"""

from __future__ import annotations

import logging
import warnings

# (category, module that issues it, start of its message)
LIBRARY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (DeprecationWarning, r"torch\.jit\._script", r"`torch\.jit\.script_method` is deprecated"),
    (FutureWarning, r"transformers\.modeling_utils", r"`is_gradient_checkpointing` is deprecated"),
    (FutureWarning, r"ray\._private\.worker", r"Tip: In future versions of Ray, Ray will no longer override"),
)
# (logger, start of the message format it logs)
LIBRARY_LOG_LINES: tuple[tuple[str, str], ...] = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class _DropMessage(logging.Filter):
    """Drop the log records whose message format starts with one text."""

    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_library_noise() -> None:
    """Install the targeted filters (again: filterwarnings drops an identical earlier one)."""
    for category, module, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, start in LIBRARY_LOG_LINES:
        logger = logging.getLogger(name)  # the same object the library gets when it is imported later
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
