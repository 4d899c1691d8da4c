"""The user's front door without Flower running: `flowertune run`'s checks, summary, plot, file modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from flowertune_llm.client.model import build_adapter_skeleton
from flowertune_llm.server.results import RunRecorder, save_checkpoint, to_toml
from flowertune_llm.server.resume import continuation_config
from flowertune_llm.server.run_summary import summary
from flowertune_llm.shared import atomic
from flowertune_llm.shared.adapters import adapter_state, to_array_record
from flowertune_llm.tools import cli, plot
from flowertune_llm.tools.export import default_output
from flowertune_llm.tools.launcher import (
    DISABLE_INSTALL,
    RunOutcome,
    RunRequest,
    effective_run_config,
    flwr_environment,
    flwr_run_command,
    follow,
)

from conftest import REPO_ROOT


@pytest.fixture
def private_home(tmp_path, monkeypatch) -> Path:
    """A Flower home that would be created by any `flwr` command: it must stay absent."""
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


@pytest.mark.parametrize(("override", "message"), [
    ("model.quantisation=8", "Unknown config key 'model.quantisation'. Did you mean 'model.quantization'?"),
    ("model.lora.r=-1", "model.lora.r must be >= 1, got -1"),
    ("train.learning-rate-max='fast'", "train.learning-rate-max must be a number, got 'fast'"),
])
def test_run_with_a_bad_config_fails_before_submission(private_home, capsys, override, message):
    assert cli.main(["run", str(REPO_ROOT), "--run-config", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Nothing was submitted." in err
    assert not private_home.exists()  # no flwr command ran: it would have created its config file


def test_run_with_an_unreadable_run_config_file_names_it(private_home, tmp_path, capsys):
    missing = tmp_path / "no-such.toml"
    assert cli.main(["run", str(REPO_ROOT), "--run-config", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not private_home.exists()


def test_run_of_a_folder_that_is_no_app_says_so(private_home, tmp_path, capsys):
    assert cli.main(["run", str(tmp_path)]) == 2
    assert "is not a Flower App folder (it has no pyproject.toml)" in capsys.readouterr().err


def test_resume_of_a_folder_that_is_no_run_says_so(private_home, tmp_path, capsys):
    assert cli.main(["resume", str(tmp_path)]) == 2
    assert "is not a run folder (it has no run-config.toml)" in capsys.readouterr().err
    assert not private_home.exists()


def test_resume_takes_the_runs_own_settings(tmp_path):
    saved = {"num-server-rounds": 7, "model.lora.r": 4, "train.max-steps": 3, "results.dir": "elsewhere"}
    (tmp_path / "run-config.toml").write_text(to_toml(saved))
    assert continuation_config(tmp_path) == {**saved, "train.resume-from": str(tmp_path.resolve())}
    assert continuation_config(tmp_path, num_server_rounds=9)["num-server-rounds"] == 9


def test_stream_keeps_run_id_folder_rounds_and_the_apps_error(tmp_path, capsys):
    # Lines as flwr 1.42 streams them (colour codes included), ending in a ServerApp traceback.
    stream = [
        "Successfully started run 1234567\n",
        "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n",
        "/x/torch/jit/_script.py:365: DeprecationWarning: `torch.jit.script_method` is deprecated.\n",
        f"\x1b[92mINFO \x1b[0m:      Results of this run go to {tmp_path}\n",
        "\x1b[92mINFO \x1b[0m:      [ROUND 1/2]\n",
        "\x1b[92mINFO \x1b[0m:      Round 1/2: 2/2 clients replied | train loss 2.0000\n",
        "\x1b[92mINFO \x1b[0m:      Exact match after round 1, per task:\n",
        "\x1b[92mINFO \x1b[0m:        task    | clients' held-out\n",
        "\x1b[92mINFO \x1b[0m:        capital |             50.0%\n",
        "\x1b[92mINFO \x1b[0m:      Saved the final adapter | not shown\n",
        "\x1b[91mERROR \x1b[0m:     ServerApp thread raised an exception: boom\n",
        "Traceback (most recent call last):\n",
        "flowertune_llm.server.results.ResultsError: results.run-name: 'x' already holds a run\n",
    ]
    outcome = RunOutcome()
    follow(iter(stream), outcome, out=sys.stdout, verbose=False)
    shown = capsys.readouterr().out.splitlines()
    assert outcome.run_id == "1234567" and outcome.folder == tmp_path and not outcome.finished
    assert outcome.error == "ResultsError: results.run-name: 'x' already holds a run"
    assert shown == [f"Results of this run go to {tmp_path}", "Round 1/2: 2/2 clients replied | train loss 2.0000",
                     "Exact match after round 1, per task:", "task    | clients' held-out",
                     "capital |             50.0%", "error: ServerApp thread raised an exception: boom"]


def test_summary_gives_final_and_best_figures_and_next_commands(tmp_path):
    rounds = [{"round": 1, "train_loss": 2.0, "eval_loss": 1.5, "eval_exact_match": 0.1},
              {"round": 2, "train_loss": 1.0, "eval_loss": 1.7, "eval_exact_match": 0.3},
              {"round": 3, "train_loss": 1.2, "eval_loss": 1.6, "eval_exact_match": 0.2}]
    (tmp_path / "metrics.json").write_text(json.dumps({"num-server-rounds": 5, "rounds": rounds}))
    (tmp_path / "adapter-final").mkdir()
    text = summary(tmp_path, 12.34, failed=False)
    assert "Rounds: 3/5 finished." in text and "Wall time 12.3 s." in text
    assert "train loss:        final 1.2000 (round 3), best 1.0000 (round 2)" in text
    assert "eval loss:         final 1.6000 (round 3), best 1.5000 (round 1)" in text
    assert "eval exact match:  final 0.2000 (round 3), best 0.3000 (round 2)" in text
    assert f"Adapter: {tmp_path / 'adapter-final'}" in text
    for command in ("flowertune chat", "flowertune evaluate", "flowertune plot",
                    f"flowertune resume {tmp_path} --num-server-rounds 8"):
        assert command in text


def _same_setting_run(folder: Path, losses: list[float]) -> Path:
    folder.mkdir()
    (folder / "run-config.toml").write_text(to_toml({"model.name": "builtin:tiny-llama", "model.quantization": 4}))
    rounds = [{"round": i + 1, "train_loss": loss, "eval_loss": loss + 0.5} for i, loss in enumerate(losses)]
    (folder / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    return folder


def test_plot_tells_two_runs_of_one_setting_apart(tmp_path, capsys):
    first = _same_setting_run(tmp_path / "lr-high", [3.0, 2.0, 1.5])
    second = _same_setting_run(tmp_path / "lr-low", [3.0, 2.5, 2.2])
    runs = [plot.load_run(first), plot.load_run(second)]
    plot.distinct_labels(runs)
    figure = plot.plot_runs(runs, ["train", "eval"], smooth=1)
    lines = {line.get_label(): line for line in figure.axes[0].lines}
    assert set(lines) == {f"tiny-llama 4-bit ({name}) ({loss})" for name in ("lr-high", "lr-low")
                          for loss in ("train", "client eval")}
    for name in ("lr-high", "lr-low"):
        train, evaluation = lines[f"tiny-llama 4-bit ({name}) (train)"], lines[f"tiny-llama 4-bit ({name}) (client eval)"]
        assert train.get_color() == evaluation.get_color()
        assert (train.get_linestyle(), evaluation.get_linestyle()) == ("-", "--")
        assert train.get_marker() and evaluation.get_marker()
    assert lines["tiny-llama 4-bit (lr-high) (train)"].get_color() != lines["tiny-llama 4-bit (lr-low) (train)"].get_color()
    ticks = [tick for tick in figure.axes[0].get_xticks() if 1 <= tick <= 3]
    assert ticks and all(float(tick).is_integer() for tick in ticks)
    output = tmp_path / "loss.png"
    assert cli.main(["plot", str(first), str(second), "--loss", "train", "eval", "--output", str(output)]) == 0
    assert output.is_file() and "(4 lines)" in capsys.readouterr().out


def test_export_writes_beside_the_adapter_by_default():
    adapter = Path("results") / "run-a" / "adapter-final"
    assert default_output(adapter) == Path("results") / "run-a" / "merged-adapter-final"


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    atomic.write_text(tmp_path / "notes.json", "{}\n")
    save_checkpoint(tmp_path, ArrayRecord({"w": torch.zeros(2)}), 1)
    assert _mode(tmp_path / "notes.json") == 0o666 & ~umask
    assert _mode(tmp_path / "checkpoint.safetensors") == 0o666 & ~umask
    assert (tmp_path / "notes.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "notes.json"]


def test_a_run_folder_and_its_adapter_follow_the_umask(tmp_path, config, umask):
    skeleton = build_adapter_skeleton(config.model, seed=0)
    recorder = RunRecorder(tmp_path / "run", config, skeleton)
    adapter = recorder.save_adapter(to_array_record(adapter_state(skeleton)), "adapter-final")
    assert _mode(tmp_path / "run") == 0o777 & ~umask
    assert _mode(adapter) == 0o777 & ~umask
    for name in ("run-config.toml", "metrics.json"):
        assert _mode(tmp_path / "run" / name) == 0o666 & ~umask
    assert all(_mode(path) == 0o666 & ~umask for path in adapter.iterdir())


def test_library_noise_is_silenced_and_other_warnings_still_show():
    # A fresh interpreter with every warning shown, as a user's would show deprecations.
    program = (
        "import logging, warnings\n"
        "import flowertune_llm, bitsandbytes\n"
        "logging.basicConfig()\n"
        "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
        "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...', 'x')\n"
        "log.warning('another bitsandbytes warning')\n"
        "warnings.warn('an unrelated deprecation', DeprecationWarning)\n"
    )
    done = subprocess.run([sys.executable, "-W", "default", "-c", program], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "script_method" not in done.stderr and "kernels-community" not in done.stderr
    assert "another bitsandbytes warning" in done.stderr and "an unrelated deprecation" in done.stderr


def test_resume_of_a_finished_run_without_more_rounds_says_how(private_home, tmp_path, capsys):
    folder = tmp_path / "done"
    folder.mkdir()
    run_config = {**effective_run_config(REPO_ROOT, []), "num-server-rounds": 2}
    (folder / "run-config.toml").write_text(to_toml(run_config))
    (folder / "metrics.json").write_text(json.dumps({"rounds": [{"round": 1}, {"round": 2}]}))
    save_checkpoint(folder, ArrayRecord({"w": torch.zeros(2)}), 2)
    assert cli.main(["resume", str(folder)]) == 2
    assert "has finished all 2 of its rounds; --num-server-rounds 7 (say) trains on" in capsys.readouterr().err
    assert not private_home.exists()


def test_flwr_run_command_streams_with_dependency_installation_off(monkeypatch):
    request = RunRequest(app=Path("."), superlink="my-link", run_config=["num-server-rounds=2"],
                         flwr_arguments=["--federation-config", "num-supernodes=4"])
    command = flwr_run_command(request)
    assert Path(command[0]).name == "flwr"
    assert command[1:] == ["run", ".", "my-link", "--run-config", "num-server-rounds=2",
                           "--federation-config", "num-supernodes=4", "--stream"]
    monkeypatch.setenv(DISABLE_INSTALL, "0")
    assert flwr_environment(install_dependencies=False)[DISABLE_INSTALL] == "1"
    assert DISABLE_INSTALL not in flwr_environment(install_dependencies=True)
