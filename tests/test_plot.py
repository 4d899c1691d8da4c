"""The loss plot command on a finished default run's metrics.json."""

from __future__ import annotations

import json
import shutil

import pytest

from flowertune_llm.tools import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_trailing_mean():
    assert plot.trailing_mean([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert plot.trailing_mean([4.0, 2.0], 1) == [4.0, 2.0]


@pytest.mark.integration  # the session's finished simulation (conftest)
def test_plot_of_two_runs_and_two_losses(finished_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    output = tmp_path / "plots" / "loss.png"
    assert plot.main([str(finished_run), str(other / "metrics.json"), "--loss", "train", "eval",
                      "--label", "run A", "run B", "--output", str(output)]) == 0
    assert output.read_bytes().startswith(PNG_SIGNATURE)
    assert "(4 lines)" in capsys.readouterr().out

    rounds = json.loads((finished_run / "metrics.json").read_text())["rounds"]
    figure = plot.plot_runs([plot.load_run(finished_run)], ["train", "eval"], smooth=1)
    lines = {line.get_label(): line for line in figure.axes[0].lines}
    assert set(lines) == {"tiny-llama 4-bit (train)", "tiny-llama 4-bit (client eval)"}
    assert list(lines["tiny-llama 4-bit (train)"].get_ydata()) == [r["train_loss"] for r in rounds]
    assert "raw per-round values" in figure.axes[0].get_title()


@pytest.mark.integration
def test_smoothing_is_drawn_and_stated(finished_run):
    figure = plot.plot_runs([plot.load_run(finished_run)], ["train"], smooth=2)
    first, second = (r["train_loss"] for r in json.loads((finished_run / "metrics.json").read_text())["rounds"])
    assert list(figure.axes[0].lines[0].get_ydata()) == [first, (first + second) / 2]
    assert "trailing mean over 2 rounds" in figure.axes[0].get_title()


@pytest.mark.integration
@pytest.mark.parametrize(("argv", "message"), [
    (["{run}", "--smooth", "0"], "--smooth must be >= 1"),
    (["{tmp}"], "has no metrics.json"),
    (["{run}", "--label", "a", "b"], "--label needs one label per run"),
    (["{run}", "--loss", "server-eval"], "none of the runs recorded server_eval_loss"),
    (["{run}", "--output", "{tmp}/loss.jpg"], "--output must end in .png"),
])
def test_bad_arguments_stop_with_one_message(finished_run, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        plot.main([a.format(run=finished_run, tmp=tmp_path) for a in argv] + (
            [] if "--output" in argv else ["--output", str(tmp_path / "x.png")]))
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
