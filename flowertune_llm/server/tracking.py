"""Per-round metrics to TensorBoard and Weights & Biases, from the records the server keeps in metrics.json.

Each tracker is given a finished round's record (the dict `RunRecorder` appends to metrics.json)
and logs its numeric fields at step = round, under metrics.json's own key names (a per-task figure
as `key/task`), so that every point in either tool traces back to one field of one record.

`results.tensorboard = true` writes TensorBoard event files into the run folder;
`results.wandb-project = "NAME"` logs to that W&B project (`WANDB_MODE=offline` keeps the run on
disk for a later `wandb sync`). Both packages come from the optional `tracking` extra and are
imported only when a tracker is opened, so a run without tracking never imports them.

Resume: the recorder logs a round before it writes the checkpoint, so every round up to the
checkpoint's is already in a tracker that was on; the continued run appends from the next round.
A tracker switched on only at the resume first logs the earlier rounds from metrics.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from flowertune_llm.shared.settings import AppConfig, ConfigError, ResultsSettings, to_run_config

# The event files' name prefix, the same for every TensorBoard writer.
EVENT_FILE_PREFIX = "events.out.tfevents."
# Where the W&B project and run id are kept, so that a resumed run goes on in the same W&B run.
WANDB_RUN = "wandb-run.json"


class TrackingError(ConfigError):
    """A tracker is asked for but cannot be used here."""


class Tracker(Protocol):
    """Something that logs a run's per-round records."""

    def log_round(self, record: dict[str, Any]) -> None:
        """Log one finished round's record."""

    def close(self) -> None:
        """Flush and close the log."""


def _requested(settings: ResultsSettings) -> list[tuple[str, Any, str]]:
    """Return (key, value, package) for each tracker the settings switch on."""
    wanted = []
    if settings.tensorboard:
        wanted.append(("results.tensorboard", True, "tensorboard"))
    if settings.wandb_project:
        wanted.append(("results.wandb-project", settings.wandb_project, "wandb"))
    return wanted


def check_trackers(settings: ResultsSettings) -> None:
    """Fail with one message per tracker whose package is not installed (on the server: clients need none)."""
    problems = []
    for key, value, package in _requested(settings):
        # find_spec looks the package up without importing it (tensorboard's import takes seconds).
        if importlib.util.find_spec(package) is None:
            shown = "true" if value is True else repr(value)
            problems.append(
                f"{key}={shown} needs the '{package}' package, which is not installed where the "
                f"server runs: pip install 'flowertune-llm[tracking]' (or pip install {package}), "
                f"or turn {key} off"
            )
    if len(problems) == 1:
        raise TrackingError(problems[0])
    if problems:
        raise TrackingError(f"{len(problems)} problems in the run config:\n  - " + "\n  - ".join(problems))


def numeric_fields(record: dict[str, Any]) -> dict[str, float]:
    """Return a record's numbers by key (its round excluded: that is the step); per-task dicts as `key/task`."""
    fields: dict[str, float] = {}
    for key, value in record.items():
        if key == "round":
            continue
        if isinstance(value, dict):
            fields.update({f"{key}/{task}": float(share) for task, share in value.items()
                           if isinstance(share, (int, float))})
        elif isinstance(value, (int, float)):  # bool included: kept_previous_adapter as 0/1
            fields[key] = float(value)
    return fields


class TensorBoardTracker:
    """Writes each round's numbers as TensorBoard scalars into the run folder."""

    def __init__(self, folder: Path, earlier_rounds: list[dict[str, Any]]) -> None:
        # torch's SummaryWriter: torch is a dependency already, and it needs nothing but the
        # `tensorboard` package (the tracking extra); tensorboard ships no writer of its own.
        from torch.utils.tensorboard import SummaryWriter

        logged_before = any(folder.glob(EVENT_FILE_PREFIX + "*"))
        last_round = earlier_rounds[-1]["round"] if earlier_rounds else 0
        # A run killed after logging a round but before its checkpoint trains that round again;
        # purge_step tells TensorBoard to drop what the earlier writer logged from that step on.
        purge_step = last_round + 1 if logged_before and last_round else None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)
        if not logged_before:
            for record in earlier_rounds:
                self._add(record)
            self.writer.flush()

    def _add(self, record: dict[str, Any]) -> None:
        for tag, value in numeric_fields(record).items():
            self.writer.add_scalar(tag, value, global_step=record["round"])

    def log_round(self, record: dict[str, Any]) -> None:
        """Add a round's scalars and flush them to disk (rounds are minutes apart: nothing to batch)."""
        self._add(record)
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


class WandbTracker:
    """Logs each round's numbers to a W&B run that has the run folder's name and its settings as config."""

    def __init__(self, folder: Path, config: AppConfig, earlier_rounds: list[dict[str, Any]]) -> None:
        import wandb

        project = config.results.wandb_project
        id_file = folder / WANDB_RUN
        saved = json.loads(id_file.read_text(encoding="utf-8")) if id_file.is_file() else {}
        # The same project: go on in the W&B run the interrupted run logged to. A new project (or
        # W&B switched on at the resume) gets a new W&B run with every round.
        resumed = saved.get("project") == project
        # W&B ids must be unique within a project, and run folder names need not be (two
        # results.dir may both hold a run 'default'): a random id, kept for a resume.
        run_id = saved["id"] if resumed else secrets.token_hex(4)
        # W&B's own files go into the run folder unless WANDB_DIR says where. Read here, at each
        # start: wandb reads its environment once per process, and a process may hold several runs.
        directory = os.environ.get("WANDB_DIR") or str(folder)
        try:
            self.run = wandb.init(project=project, name=folder.name, id=run_id,
                                  resume="allow", dir=directory, config=to_run_config(config))
        except Exception as error:  # wandb raises its own UsageError/CommError types, and others
            raise TrackingError(
                f"results.wandb-project={project!r}: W&B could not start a run "
                f"({type(error).__name__}: {error}). Log in with `wandb login`, or set WANDB_MODE=offline "
                "and upload later with `wandb sync`"
            ) from error
        if not resumed:
            id_file.write_text(json.dumps({"project": project, "id": run_id}) + "\n", encoding="utf-8")
            for record in earlier_rounds:
                self.log_round(record)

    def log_round(self, record: dict[str, Any]) -> None:
        """Log a round's numbers at step = round."""
        self.run.log(numeric_fields(record), step=record["round"])

    def close(self) -> None:
        """Finish the W&B run (offline: the files are complete for `wandb sync`)."""
        self.run.finish()


def open_trackers(folder: Path, config: AppConfig, earlier_rounds: Iterable[dict[str, Any]] = ()) -> list[Tracker]:
    """Return the trackers the settings switch on, each caught up with the earlier rounds of a resumed run."""
    earlier = list(earlier_rounds)
    trackers: list[Tracker] = []
    if config.results.tensorboard:
        trackers.append(TensorBoardTracker(folder, earlier))
    if config.results.wandb_project:
        trackers.append(WandbTracker(folder, config, earlier))
    return trackers
