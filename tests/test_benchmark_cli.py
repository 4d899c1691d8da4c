"""The round benchmark refuses bad arguments before running anything."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO_ROOT


def _benchmark():
    spec = importlib.util.spec_from_file_location("round_benchmark", REPO_ROOT / "benchmarks" / "round_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "1"], "--rounds must be >= 2"),
    (["--run-config", "model.quantization=3"], "model.quantization must be 4 or 8"),
    (["--run-config", "train.nope=1"], "Key 'train.nope' is not present"),
    (["--compare", "speed"], "invalid choice: 'speed'"),
])
def test_bad_arguments_stop_with_one_message(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        _benchmark().main([*argv, "--output", str(tmp_path)])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
