"""Continue an interrupted run from its results folder (`train.resume-from`).

The folder's checkpoint holds the global adapter after the last finished round; metrics.json holds
that round's records (and perhaps one more, if the run died between the two writes: it is
dropped and the round trained again). A run continues only with the settings it was started with,
because clients train with the run config they are given.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.common.config import flatten_dict
from safetensors import safe_open
from safetensors.torch import load_file

from flowertune_llm.server.results import CHECKPOINT, METRICS, RUN_CONFIG
from flowertune_llm.shared.adapters import to_array_record
from flowertune_llm.shared.settings import AppConfig, to_run_config

# Keys that may differ between the interrupted run and its continuation. num-server-rounds may
# grow (`flowertune resume RUN --num-server-rounds N` trains on): the rounds already done keep their
# records, and the learning-rate schedule spans the new total from the next round on. The trackers
# only watch: one switched on at a resume is first given the rounds already done.
FREE_TO_CHANGE = ("train.resume-from", "results.dir", "results.run-name", "num-server-rounds",
                  "results.tensorboard", "results.wandb-project")


class ResumeError(RuntimeError):
    """The run named by `train.resume-from` cannot be continued."""


@dataclass
class ResumePoint:
    """Where an interrupted run stands: its folder, last finished round, adapter and records."""

    folder: Path
    round: int
    arrays: ArrayRecord
    rounds: list[dict[str, Any]]


def _changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [
        f"{key}={saved[key]!r} (now {current[key]!r})"
        for key in saved
        if key in current and key not in FREE_TO_CHANGE and saved[key] != current[key]
    ]


def continuation_config(folder: Path, num_server_rounds: int | None = None) -> dict[str, Any]:
    """Return the flat run config that continues the run in `folder` with its own saved settings."""
    name = str(folder)
    if not (folder / RUN_CONFIG).is_file():
        raise ResumeError(f"RUN_FOLDER: '{name}' is not a run folder (it has no {RUN_CONFIG}); "
                          "give a folder such as 'results/<run-name>'")
    if num_server_rounds is not None and num_server_rounds < 1:
        raise ResumeError(f"--num-server-rounds must be >= 1, got {num_server_rounds}")
    saved = flatten_dict(tomllib.loads((folder / RUN_CONFIG).read_text(encoding="utf-8")))
    saved["train.resume-from"] = str(folder.expanduser().resolve())
    if num_server_rounds is not None:
        saved["num-server-rounds"] = num_server_rounds
    return saved


def find_resume_point(config: AppConfig) -> ResumePoint:
    """Read the run folder named by `train.resume-from`, checking it can be continued as configured."""
    name = config.train.resume_from
    folder = Path(name).expanduser().resolve()
    key = "train.resume-from"
    if not folder.is_dir():
        raise ResumeError(f"{key}: '{name}' is not a folder; give a run folder such as 'results/<run-name>'")
    if not (folder / RUN_CONFIG).is_file() or not (folder / METRICS).is_file():
        raise ResumeError(f"{key}: '{name}' is not a run folder (it has no {RUN_CONFIG} and {METRICS})")
    if not (folder / CHECKPOINT).is_file():
        raise ResumeError(
            f"{key}: the run in '{name}' stopped before its first round finished, so there is nothing "
            "to continue; start it again without train.resume-from"
        )
    saved = flatten_dict(tomllib.loads((folder / RUN_CONFIG).read_text(encoding="utf-8")))
    changed = _changed_settings(saved, to_run_config(config))
    if changed:
        raise ResumeError(
            f"{key}: the run in '{name}' was started with other settings, and clients train with the "
            "settings given now. Resume with the run's own settings; these differ: " + ", ".join(changed)
        )
    with safe_open(folder / CHECKPOINT, framework="pt") as checkpoint:
        last_round = int(checkpoint.metadata()["round"])
    arrays = to_array_record(load_file(folder / CHECKPOINT), "float32")
    records = json.loads((folder / METRICS).read_text(encoding="utf-8"))["rounds"]
    return ResumePoint(folder, last_round, arrays, [r for r in records if r["round"] <= last_round])
