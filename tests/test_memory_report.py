"""The memory report: a real measurement on the tiny default, the reference settings' set-up, argument checks."""

from __future__ import annotations

import json

import pytest

from flowertune_llm.shared.settings import parse_config
from flowertune_llm.tools import memory_report

from conftest import REPO_ROOT


@pytest.mark.slow  # the app's training, in a subprocess
def test_tiny_default_is_measured_in_a_fresh_process(tmp_path, capsys):
    output = tmp_path / "memory.json"
    assert memory_report.main(["--setting", "tiny", "--steps", "1", "--json", str(output)]) == 0
    printed = capsys.readouterr().out
    header, _, reference_row, app_row = printed.strip().splitlines()[-4:]
    assert header.split("|")[1].strip() == "Models" and header.split("|")[2].strip() == "tiny"
    assert reference_row.split("|")[1].strip() == "VRAM (reference)"
    assert app_row.split("|")[1].strip() == "peak RSS, CPU, app" and app_row.split("|")[2].strip().endswith("GB")
    figures = json.loads(output.read_text())["measurements"][0]
    assert figures["setting"] == "tiny" and figures["variant"] == "app" and figures["device"] == "cpu"
    # One step of batch 16 x 256 tokens really ran, and the peak covers loading and training.
    assert figures["tokens"] == 16 * 256
    assert figures["peak_rss_mb"] >= figures["rss_after_load_mb"] >= figures["rss_after_imports_mb"] > 0


@pytest.mark.parametrize("setting", sorted(memory_report.REFERENCE_VRAM_GB) + ["llama2-7b-4bit"])
def test_reference_settings_resolve_to_a_known_architecture(setting):
    run_config = memory_report.setting_run_config(setting, {}, REPO_ROOT)
    parse_config(run_config)
    model_config = memory_report.architecture(run_config["model.name"])
    width = {"3b": 3200, "7b": 4096}[setting.split("-")[1]]
    assert model_config.hidden_size == width and model_config.vocab_size == 32000


def test_table_has_the_reference_layout():
    measurements = [
        memory_report.Measurement("openllama-7b-4bit", "app", {"peak_gpu_reserved_mb": 9216.0, "peak_rss_mb": 1.0}),
        memory_report.Measurement("openllama-3b-4bit", "app", {"peak_gpu_reserved_mb": 6144.0, "peak_rss_mb": 1.0}),
    ]
    lines = memory_report.table(measurements, ["openllama-7b-4bit", "openllama-3b-4bit"], ["app"]).splitlines()
    assert [cell.strip() for cell in lines[0].strip("| ").split("|")] == ["Models", "7-billion (4-bit)", "3-billion (4-bit)"]
    assert [cell.strip() for cell in lines[2].strip("| ").split("|")] == ["VRAM (reference)", "~16.50 GB", "~10.60 GB"]
    assert [cell.strip() for cell in lines[3].strip("| ").split("|")] == [
        "peak GPU memory (reserved), app", "9.00 GB", "6.00 GB"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--setting", "openllama-13b"], "no setting 'openllama-13b'"),
    (["--variants", "smaller"], "invalid choice: 'smaller'"),
    (["--run-config", "train.batch-size=0"], "train.batch-size must be >= 1"),
])
def test_bad_arguments_stop_with_one_message(capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        memory_report.main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_settings_come_from_the_app_folder_given_not_the_installed_package(tmp_path):
    app = tmp_path / "my-app"
    (app / "presets").mkdir(parents=True)
    (app / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text().replace(
        "model.lora.r = 16", "model.lora.r = 4"))
    (app / "presets" / "mine.toml").write_text("train.seq-length = 128\n")
    run_config = memory_report.setting_run_config("mine", {}, app)
    assert (run_config["model.lora.r"], run_config["train.seq-length"]) == (4, 128)
    with pytest.raises(ValueError, match="no setting 'openllama-3b-4bit'"):
        memory_report.setting_run_config("openllama-3b-4bit", {}, app)  # a preset of this repo, not of that app


def test_an_app_folder_without_pyproject_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        memory_report.main(["--app", str(tmp_path)])
    assert stopped.value.code == 2
    assert f"--app {tmp_path}: no pyproject.toml there" in capsys.readouterr().err
