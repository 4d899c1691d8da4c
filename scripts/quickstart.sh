#!/usr/bin/env bash
# Quick start: create .venv, install torch and the app, then run the default federation to the end.
#
#   scripts/quickstart.sh            # install, then `flowertune run .` (5 rounds of the built-in tiny model)
#   scripts/quickstart.sh install    # install only (what .ci/run calls before the tests)
#
# torch is the CPU build unless FLOWERTUNE_TORCH=cuda: on Linux the default package index serves a
# multi-GB CUDA build, so the CPU build comes from PyTorch's CPU index, unless a torch wheel is
# already available locally (pip's find-links), which is then used as it is. macOS wheels are CPU
# (and MPS) builds on the default index. TORCH_INDEX_URL names another index outright.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
PYTHON=${PYTHON:-python3}

install() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "error: Python >= 3.11 is needed; $PYTHON is $("$PYTHON" -V 2>&1). Set PYTHON=python3.12 (say)." >&2; exit 2; }
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    local torch_source=() where
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        torch_source=(--index-url "$TORCH_INDEX_URL") where="from $TORCH_INDEX_URL"
    elif [ "${FLOWERTUNE_TORCH:-cpu}" = cuda ]; then
        where="from the default index (CUDA build on Linux)"
    elif .venv/bin/python -m pip install --quiet --dry-run --no-deps --no-index "torch==$TORCH_VERSION" >/dev/null 2>&1; then
        where="from the wheel pip finds locally"  # pip's find-links, or already installed
    elif [ "$(uname -s)" = Linux ]; then
        torch_source=(--index-url "$CPU_INDEX") where="CPU build from $CPU_INDEX"
    else
        where="from the default index (CPU/MPS build on macOS)"
    fi
    echo "Installing torch $TORCH_VERSION, $where ..."
    .venv/bin/python -m pip install --quiet "torch==$TORCH_VERSION" ${torch_source[@]+"${torch_source[@]}"}
    # torch first, so resolving the app's `torch` requirement keeps this build.
    echo "Installing the app and its test tools ..."
    .venv/bin/python -m pip install --quiet -e ".[test]"
    .venv/bin/python -c "import torch, flwr; print('torch', torch.__version__, '| flwr', flwr.__version__)"
    # The built-in base is pretrained when first built (a few minutes on 2 CPU cores): do it once here,
    # so that the first run does not wait for it.
    echo "Building the built-in tiny models ..."
    .venv/bin/python -m flowertune_llm.builtin.models
}

case "${1:-all}" in
    install) install ;;
    all) install; exec .venv/bin/flowertune run . ;;
    *) echo "error: unknown step '$1'; accepted: install, or nothing (install, then run)" >&2; exit 2 ;;
esac
