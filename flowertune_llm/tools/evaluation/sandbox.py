"""Run one generated program in a child process with time and memory limits, and say if it passed.

A program passes when it exits 0 within its limits, as in the bigcode harness (Python, with the
tests appended) and MultiPL-E (JavaScript through node, C++ through g++ -std=c++17). The child gets
its own session (so a timeout kills everything it started), an empty temporary working folder,
no standard input, and `resource.setrlimit` limits on CPU seconds, address space, file size and
open files. This stops accidents (an endless loop, a runaway allocation, a full disk); it is not a
security boundary, so run untrusted generations in a container or VM as well.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The reference's time limits: 3 s per Python program (bigcode harness), 5 s for node and 15 s
# for each C++ compile and run (MultiPL-E).
TIME_LIMITS_S = {"python": 3.0, "javascript": 5.0, "cpp": 15.0}
# Address space per child. The reference sets none; 4 GiB still lets node map its heap reserve
# and g++ compile a test file, and stops an allocation that would take the host down.
MEMORY_LIMIT_BYTES = 4 << 30
FILE_SIZE_LIMIT_BYTES = 64 << 20
OUTPUT_KEEP_CHARS = 2048
TOOLS = {"javascript": ("node",), "cpp": ("g++",)}


@dataclass(frozen=True)
class Outcome:
    """How a program ended: passed or not, and a short status (ok, failed, timeout, memory, ...)."""

    passed: bool
    status: str
    detail: str = ""


def missing_tools(languages: set[str]) -> list[str]:
    """Return the programs (node, g++) that running these languages needs and PATH lacks."""
    return sorted({tool for language in languages for tool in TOOLS.get(language, ()) if shutil.which(tool) is None})


# Sets the limits, then becomes the program (exec keeps them). A launcher process rather than
# subprocess's `preexec_fn`, which is unsafe in a parent with threads (torch's).
_LAUNCHER = """
import os, resource, sys
cpu, memory, size = (int(value) for value in sys.argv[1:4])
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, size),
                     (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
os.execvp(sys.argv[4], sys.argv[4:])
"""


def _limited(command: list[str], cpu_seconds: float, memory_bytes: int) -> list[str]:
    """Return `command` prefixed by the launcher that applies the CPU, memory and file limits."""
    cpu = max(1, int(cpu_seconds + 0.999))
    return [sys.executable, "-I", "-c", _LAUNCHER, str(cpu), str(memory_bytes), str(FILE_SIZE_LIMIT_BYTES), *command]


def _run(command: list[str], folder: Path, time_limit: float, memory_bytes: int) -> Outcome:
    """Run a command in `folder` under the limits, killing its whole session when time runs out."""
    process = subprocess.Popen(
        _limited(command, time_limit, memory_bytes), cwd=folder, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(folder), "LANG": "C.UTF-8"},
    )
    try:
        _, stderr = process.communicate(timeout=time_limit + 1.0)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return Outcome(False, "timeout", f"killed after {time_limit + 1.0:g} s")
    message = stderr.decode("utf-8", errors="replace")[-OUTPUT_KEEP_CHARS:]
    if process.returncode == 0:
        return Outcome(True, "ok")
    if process.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome(False, "timeout", f"CPU limit of {time_limit:g} s")
    if "MemoryError" in message or "std::bad_alloc" in message or "heap out of memory" in message:
        return Outcome(False, "memory", message)
    return Outcome(False, "failed", message)


def run_program(
    language: str, source: str, time_limit: float | None = None, memory_bytes: int = MEMORY_LIMIT_BYTES
) -> Outcome:
    """Run a complete program (solution plus tests) in `language`: python, javascript or cpp."""
    limit = TIME_LIMITS_S[language] if time_limit is None else time_limit
    with tempfile.TemporaryDirectory(prefix="flowertune-sandbox-") as name:
        folder = Path(name)
        if language == "python":
            (folder / "program.py").write_text(source, encoding="utf-8")
            # -I: isolated mode, so the program sees neither this project nor user site-packages.
            return _run([sys.executable, "-I", "program.py"], folder, limit, memory_bytes)
        if language == "javascript":
            (folder / "program.js").write_text(source, encoding="utf-8")
            return _run(["node", "program.js"], folder, limit, memory_bytes)
        if language == "cpp":
            (folder / "program.cpp").write_text(source, encoding="utf-8")
            built = _run(["g++", "program.cpp", "-o", "program", "-std=c++17"], folder, limit, memory_bytes)
            if not built.passed:
                return Outcome(False, "compile-error" if built.status == "failed" else built.status, built.detail)
            return _run(["./program"], folder, limit, memory_bytes)
    raise ValueError(f"language: '{language}' is not one of {', '.join(TIME_LIMITS_S)}")
