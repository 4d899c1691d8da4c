"""Plot loss over rounds from one or more runs' metrics.json: one line per run and loss.

    flowertune plot results/<run-a> results/<run-b> --output loss.png
    flowertune plot results/<run> --loss train eval server-eval --smooth 5

Each run has one colour; its train loss is solid, eval dashed, server eval dotted, with a marker
per round on integer round ticks. Lines are labelled by setting (model and bits, from the run's
run-config.toml), plus the run's name where two runs share a setting, unless `--label` names them.
`train` is the clients' mean local SFT loss of each round; `eval` the global adapter's loss on the
clients' held-out shares (client federated evaluation); `server-eval` its loss on the
server's held-out set. `--smooth k` draws the trailing mean of the last k rounds (the rounds before
the k-th average what there is); the default, 1, draws the raw per-round values. The plot says which.
Needs matplotlib (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LOSSES = {"train": "train_loss", "eval": "eval_loss", "server-eval": "server_eval_loss"}
LOSS_WORDS = {"train": "train", "eval": "client eval", "server-eval": "server eval"}
LINE_STYLES = {"train": "-", "eval": "--", "server-eval": ":"}
MARKERS = {"train": "o", "eval": "s", "server-eval": "^"}


class RunFolderError(ValueError):
    """A run folder has no readable metrics.json."""


@dataclass
class RunCurves:
    """One run's per-round records and the label of its setting."""

    label: str
    rounds: list[dict]
    name: str = ""

    def series(self, loss: str) -> tuple[list[int], list[float]]:
        """Return (rounds, values) of a loss (a key of LOSSES), skipping rounds that lack it."""
        pairs = [(r["round"], r[LOSSES[loss]]) for r in self.rounds if LOSSES[loss] in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def setting_label(folder: Path) -> str:
    """Return a run's setting as a label: its model's short name and bits, from run-config.toml."""
    config_file = folder / "run-config.toml"
    if not config_file.is_file():
        return folder.name
    config = tomllib.loads(config_file.read_text(encoding="utf-8"))
    model = str(config.get("model", {}).get("name", "model")).removeprefix("builtin:").rstrip("/").rsplit("/", 1)[-1]
    bits = config.get("model", {}).get("quantization")
    return f"{model} {bits}-bit" if bits in (4, 8) else f"{model} bf16"


def load_run(path: Path) -> RunCurves:
    """Read a run folder (or its metrics.json) into its curves."""
    metrics_file = path / "metrics.json" if path.is_dir() else path
    if not metrics_file.is_file():
        raise RunFolderError(f"'{path}' is not a run folder: it has no metrics.json")
    try:
        rounds = json.loads(metrics_file.read_text(encoding="utf-8"))["rounds"]
    except (ValueError, KeyError, TypeError) as error:
        raise RunFolderError(f"'{metrics_file}' cannot be read: {type(error).__name__}: {error}") from None
    return RunCurves(label=setting_label(metrics_file.parent), rounds=rounds, name=metrics_file.parent.name)


def distinct_labels(runs: Sequence[RunCurves]) -> None:
    """Add the run's name to every label that more than one run shares (same model and bits)."""
    labels = [run.label for run in runs]
    for run in runs:
        if labels.count(run.label) > 1 and run.name:
            run.label = f"{run.label} ({run.name})"


def trailing_mean(values: Sequence[float], window: int) -> list[float]:
    """Return the mean of each value and the up to `window - 1` values before it."""
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def plot_runs(runs: Sequence[RunCurves], losses: Sequence[str], smooth: int):
    """Return a matplotlib Figure with one line per run and loss (rounds on x, loss on y)."""
    from matplotlib import rcParams
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(8, 5), dpi=120)
    axes = figure.add_subplot()
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        for loss in losses:
            rounds, values = run.series(loss)
            if rounds:
                suffix = f" ({LOSS_WORDS[loss]})" if len(losses) > 1 else ""
                axes.plot(rounds, trailing_mean(values, smooth), linestyle=LINE_STYLES[loss], marker=MARKERS[loss],
                          color=colours[index % len(colours)], label=run.label + suffix)
    if not axes.lines:
        raise RunFolderError("none of the runs recorded " + " or ".join(LOSSES[loss] for loss in losses))
    what = " / ".join(LOSS_WORDS[loss] for loss in losses)
    how = "raw per-round values" if smooth == 1 else f"trailing mean over {smooth} rounds"
    axes.set(xlabel="round", ylabel=f"{what} loss", title=f"{what.capitalize()} loss over rounds ({how})")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole: no 1.5
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def main(argv: list[str] | None = None) -> int:
    """Parse and check arguments, read the runs, write the PNG."""
    parser = argparse.ArgumentParser(prog="flowertune plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (results/<run>) or their metrics.json")
    # Under results/ (git-ignored): `flwr run` bundles every other file of the app folder into its FAB.
    parser.add_argument("--output", type=Path, default=Path("results") / "loss-over-rounds.png", help="PNG file to write")
    parser.add_argument("--loss", nargs="+", choices=list(LOSSES), default=["train"], help="which losses to draw")
    parser.add_argument("--smooth", type=int, default=1, help="trailing mean over this many rounds (1 = none)")
    parser.add_argument("--label", nargs="+", default=None, help="one label per run (default: model and bits)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    if args.label is not None and len(args.label) != len(args.runs):
        parser.error(f"--label needs one label per run: {len(args.runs)} runs, {len(args.label)} labels")
    if args.output.suffix.lower() != ".png":
        parser.error(f"--output must end in .png, got '{args.output}'")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error('matplotlib is not installed: pip install -e ".[plot]"')
    try:
        runs = [load_run(path) for path in args.runs]
        distinct_labels(runs)
        for run, label in zip(runs, args.label or []):
            run.label = label
        figure = plot_runs(runs, args.loss, args.smooth)
    except RunFolderError as error:
        parser.error(str(error))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output)
    print(f"Wrote {args.output} ({len(figure.axes[0].lines)} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
