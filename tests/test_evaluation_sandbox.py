"""The code suite's sandbox: passing programs pass; endless loops and huge allocations are stopped and fail."""

from __future__ import annotations

import shutil

import pytest

from flowertune_llm.tools.evaluation.sandbox import run_program

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
needs_gpp = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


def test_python_program_with_passing_tests_passes() -> None:
    outcome = run_program("python", "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n")
    assert outcome.passed and outcome.status == "ok"


def test_python_program_with_a_failing_assertion_fails() -> None:
    outcome = run_program("python", "def add(a, b):\n    return a - b\n\nassert add(1, 2) == 3\n")
    assert not outcome.passed and outcome.status == "failed"
    assert "AssertionError" in outcome.detail


def test_endless_loop_is_stopped_and_fails() -> None:
    outcome = run_program("python", "while True:\n    pass\n", time_limit=1.0)
    assert not outcome.passed and outcome.status == "timeout"


def test_endless_loop_in_a_child_process_is_stopped_too() -> None:
    # The child sleeps (using no CPU) in its own process: only the session-wide kill ends it.
    program = "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    outcome = run_program("python", program, time_limit=1.0)
    assert not outcome.passed and outcome.status == "timeout"


def test_over_allocation_is_stopped_and_fails() -> None:
    outcome = run_program("python", "block = bytearray(8 << 30)\n", memory_bytes=1 << 30)
    assert not outcome.passed and outcome.status == "memory"


@needs_node
def test_javascript_runs_with_node() -> None:
    assert run_program("javascript", "const assert = require('node:assert');\nassert.deepEqual(1 + 1, 2);\n").passed
    failed = run_program("javascript", "const assert = require('node:assert');\nassert.deepEqual(1 + 1, 3);\n")
    assert not failed.passed
    assert run_program("javascript", "while (true) {}\n", time_limit=1.0).status == "timeout"


@needs_gpp
def test_cpp_compiles_and_runs() -> None:
    assert run_program("cpp", "#include <cassert>\nint main() { assert(1 + 1 == 2); return 0; }\n").passed
    assert not run_program("cpp", "#include <cassert>\nint main() { assert(1 + 1 == 3); }\n").passed
    assert run_program("cpp", "int main() { retrn 0; }\n").status == "compile-error"
