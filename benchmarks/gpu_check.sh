#!/usr/bin/env bash
# Everything GPU-specific in one short run (benchmarks/gpu_check.py says what each step checks).
#   bash benchmarks/gpu_check.sh              # on a GPU machine: ~8 minutes on one H200, no model hub
#   bash benchmarks/gpu_check.sh --dry-run    # CPU, tiny model: the same steps at toy size
# The summary JSON goes to $OUT/gpu-check.json where $OUT is set (else benchmarks/results/).
# The Python of the app's environment: .venv next to this repository if there is one.
set -u
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
# The outer limit (GPU_CHECK_LIMIT_S): the steps share a 480 s budget (--budget-s); this leaves a
# minute for the summary. Each step is also killed at its own timeout, so this one is a safety net.
exec timeout --kill-after=10 "${GPU_CHECK_LIMIT_S:-540}" "$PYTHON" benchmarks/gpu_check.py "$@"
