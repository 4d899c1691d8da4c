"""A run's results folder: the resolved config, per-round metrics and the global adapters.

Layout of `results/<run-name>/`:
  run-config.toml        every setting of the run (reusable: `flwr run . --run-config <it>`)
  metrics.json           one record per finished round
  checkpoint.safetensors the latest global adapter and its round: what `train.resume-from` continues
  adapter-round-<k>/     the global adapter after round k (every `train.save-every-round` rounds)
  adapter-final/         the global adapter after the last round
  events.out.tfevents.*  per-round metrics for TensorBoard (`results.tensorboard`)
  wandb/, wandb-run.json W&B's files, project and run id (`results.wandb-project`; wandb/ elsewhere if WANDB_DIR is set)
Each adapter folder holds peft's files and `flowertune-adapter.json` (base model, prompt format).
Every file is written to a temporary name and renamed, so a killed run never leaves a half-written
file behind. metrics.json, then the trackers (flowertune_llm/server/tracking.py), then the checkpoint are
written, so the checkpoint's round is never ahead of the metrics or the trackers; a resume drops any
metrics record after the checkpoint's round.
With `evaluate.on-receipt` a round's clients' evaluation arrives with the next round's train replies:
its record is written (and checkpointed) without it, marked pending, and completed then; the
trackers and the round line get it once complete. A resume after a pending round evaluates it first.
"""

from __future__ import annotations

import json
import math
import os
import time
from logging import INFO
from pathlib import Path
from typing import Any

import tomli_w
from flwr.app import ArrayRecord
from flwr.common.config import flatten_dict
from flwr.common.logger import log
from peft import PeftModel
from safetensors.torch import save_file

from flowertune_llm.server.tracking import open_trackers
from flowertune_llm.shared import atomic
from flowertune_llm.shared.adapter_card import card_for, write_card
from flowertune_llm.shared.adapters import from_array_record, load_adapter_state
from flowertune_llm.shared.devices import expected_gpu_note, round_device
from flowertune_llm.shared.settings import AppConfig, ResultsSettings, to_run_config

FINAL_ADAPTER = "adapter-final"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.json"
RUN_CONFIG = "run-config.toml"


class ResultsError(RuntimeError):
    """The results folder cannot be created or would overwrite an earlier run."""


def run_folder(settings: ResultsSettings, config: AppConfig) -> Path:
    """Return the run's folder, checking that it is new and can be created (nothing is written)."""
    root = Path(settings.dir).expanduser().resolve()
    if settings.run_name:
        name = settings.run_name
    else:
        model = Path(config.model.name.replace("builtin:", "")).name or "model"
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{config.model.quantization}bit"
    folder = root / name
    if folder.exists():
        raise ResultsError(
            f"results.run-name: '{folder}' already holds a run; choose another results.run-name "
            "or leave it empty for a fresh time-stamped name. Nothing was overwritten."
        )
    existing = next((parent for parent in (root, *root.parents) if parent.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ResultsError(f"results.dir: cannot create '{root}': '{existing}' is not a writable folder")
    return folder


def to_toml(config: dict[str, Any]) -> str:
    """Render a run config (flat or nested) as TOML with dotted keys, the format `--run-config` reads."""
    # One `group.key = value` line per setting, as in pyproject.toml's [tool.flwr.app.config], so a
    # saved run config greps and diffs against it. tomli_w writes tables, never dotted keys, so it
    # renders each value on its own; flatten_dict rejects a value that is no run-config scalar.
    return "".join(f"{key} = {tomli_w.dumps({'value': value}).removeprefix('value = ')}"
                   for key, value in flatten_dict(config).items())


def save_checkpoint(folder: Path, arrays: ArrayRecord, server_round: int) -> None:
    """Save the global adapter after `server_round` (float32, safetensors) through a rename."""
    state = {name: tensor.float().contiguous() for name, tensor in from_array_record(arrays).items()}
    with atomic.staged_file(folder / CHECKPOINT) as temporary:
        save_file(state, temporary, metadata={"round": str(server_round)})


class RunRecorder:
    """Writes the results folder as rounds finish and logs one progress line per round.

    A new run (`earlier_rounds` None) creates the folder; a resumed one continues it, keeping the
    records of the rounds it already finished. `pending` is the round whose record still waits for
    its clients' evaluation (`evaluate.on-receipt`), if any: always the last one.
    """

    def __init__(
        self,
        folder: Path,
        config: AppConfig,
        skeleton: PeftModel,
        earlier_rounds: list[dict[str, Any]] | None = None,
    ) -> None:
        self.folder = folder
        self.config = config
        self.skeleton = skeleton
        self.started = time.monotonic()
        self.pending: int | None = None
        if earlier_rounds is None:
            self.rounds: list[dict[str, Any]] = []
            self.resumed_after: list[int] = []
            folder.mkdir(parents=True)
            atomic.write_text(folder / RUN_CONFIG, to_toml(to_run_config(config)))
        else:
            self.rounds = list(earlier_rounds)
            previous = json.loads((folder / METRICS).read_text(encoding="utf-8"))
            last_round = self.rounds[-1]["round"] if self.rounds else 0
            self.resumed_after = [*previous.get("resumed-after-round", []), last_round]
            # Elapsed time goes on from where the interrupted run left it.
            self.started -= self.rounds[-1]["elapsed_s"] if self.rounds else 0.0
            # Every evaluated round has `eval_sampled`, even one whose evaluations all failed.
            if config.evaluate.on_receipt and self.rounds and "eval_sampled" not in self.rounds[-1]:
                self.pending = self.rounds[-1]["round"]
        self._write_metrics()
        complete = self.rounds if self.pending is None else self.rounds[:-1]
        self.trackers = open_trackers(folder, config, complete)

    def _derive(self, record: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
        """Add the fields computed from a round's figures: device, perplexities, bytes so far."""
        device = round_device(record.get("trained_on_gpu"))
        if device is not None:
            record["device"] = device
        for loss in ("eval_loss", "server_eval_loss"):
            if loss in record:
                record[loss.replace("loss", "perplexity")] = math.exp(min(record[loss], 50.0))
        previous_total = earlier[-1].get("bytes_total", 0) if earlier else 0
        record["bytes_total"] = previous_total + record.get("bytes_down", 0) + record.get("bytes_up", 0)

    def end_round(
        self, server_round: int, arrays: ArrayRecord, stats: dict[str, Any], evaluation_pending: bool = False
    ) -> None:
        """Record a finished round: metrics, then checkpoint, then the adapter when due.

        `evaluation_pending`: the clients' evaluation of this round's adapter comes later
        (`complete_round`); until then the trackers and the full round line wait for it.
        """
        record: dict[str, Any] = {"round": server_round, **stats}
        self._derive(record, self.rounds)
        record["elapsed_s"] = round(time.monotonic() - self.started, 2)
        self.rounds.append(record)
        self._write_metrics()
        if not evaluation_pending:
            for tracker in self.trackers:
                tracker.log_round(record)
        save_checkpoint(self.folder, arrays, server_round)
        every = self.config.train.save_every_round
        if every and server_round % every == 0:
            self.save_adapter(arrays, f"adapter-round-{server_round:03d}")
        if evaluation_pending:
            self.pending = server_round
            log(INFO, "%s | clients evaluate it in round %d", self.progress_line(record), server_round + 1)
        else:
            log(INFO, "%s", self.progress_line(record))

    def complete_round(self, stats: dict[str, Any]) -> None:
        """Add the pending round's evaluation (`stats`: the round's figures, evaluation included)."""
        record = self.rounds[-1]
        assert record["round"] == self.pending, (record["round"], self.pending)
        record.update({key: value for key, value in stats.items() if key != "round"})
        self._derive(record, self.rounds[:-1])
        self.pending = None
        self._write_metrics()
        for tracker in self.trackers:
            tracker.log_round(record)
        log(INFO, "%s", self.progress_line(record))

    def progress_line(self, record: dict[str, Any]) -> str:
        """Return the one-line summary of a round."""
        parts = [
            f"Round {record['round']}/{self.config.num_server_rounds}:",
            f"{record.get('train_replies', 0)}/{record.get('train_sampled', 0)} clients replied",
        ]
        missing = record.get("train_sampled", 0) - record.get("train_replies", 0) - record.get("train_failures", 0)
        problems = [
            f"{count} {what}"
            for count, what in (
                (record.get("train_failures", 0), "failed"),
                (record.get("train_rejected", 0), "rejected"),
                (missing, "no reply before strategy.round-timeout"),
            )
            if count
        ]
        if problems:
            parts.append("(" + ", ".join(problems) + ")")
        gpu_note = expected_gpu_note(self.config.train.expect_gpu, record.get("device"))
        if gpu_note:
            parts.append(f"| {gpu_note}")
        if record.get("kept_previous_adapter"):
            parts.append("| global adapter unchanged")
        if "train_loss" in record:
            parts.append(f"| train loss {record['train_loss']:.4f}")
        if "eval_loss" in record:
            parts.append(f"| eval loss {record['eval_loss']:.4f} (ppl {record['eval_perplexity']:.1f})")
        if "eval_exact_match" in record:
            parts.append(f"| exact match {record['eval_exact_match']:.1%} of {record['eval_exact_match_examples']}")
        if "server_eval_loss" in record:
            parts.append(f"| server eval loss {record['server_eval_loss']:.4f}")
        if "server_exact_match" in record:
            parts.append(f"| server exact match {record['server_exact_match']:.1%} of "
                         f"{record['server_exact_match_examples']}")
        if "privacy_epsilon" in record:
            parts.append(f"| privacy spent: epsilon {record['privacy_epsilon']:.2f} at delta {record['privacy_delta']:g}")
        parts.append(f"| lr {record.get('learning_rate', float('nan')):.2e}")
        parts.append(f"| {record['bytes_total'] / 1e6:.2f} MB sent so far | {record['elapsed_s']:.1f} s elapsed")
        return " ".join(parts)

    def save_adapter(self, arrays: ArrayRecord, name: str) -> Path:
        """Save a global adapter with peft's `save_pretrained`, plus its base model and prompt format."""
        load_adapter_state(self.skeleton, from_array_record(arrays))
        target = self.folder / name
        with atomic.staged_folder(target, replace=True) as staging:
            self.skeleton.save_pretrained(staging, safe_serialization=True)
            write_card(staging, card_for(self.config.model))
            atomic.give_normal_modes(staging)  # mkdtemp's folder is 0700, safetensors' files 0600
        return target

    def finish(self, arrays: ArrayRecord) -> Path:
        """Save the final global adapter, log the last round's exact match per task, return the folder."""
        if self.pending is not None:  # nothing evaluated it (a resume that trains no further round)
            self.complete_round({})
        for line in self.per_task_table():
            log(INFO, "%s", line)
        final = self.save_adapter(arrays, FINAL_ADAPTER)
        for tracker in self.trackers:
            tracker.close()
        return final

    def per_task_table(self) -> list[str]:
        """Return the last round's exact match per task as table lines (none without per-task figures)."""
        last = self.rounds[-1] if self.rounds else {}
        columns = [(title, last[key]) for title, key in (("clients' held-out", "eval_exact_match_per_task"),
                                                          ("server held-out", "server_exact_match_per_task"))
                   if last.get(key)]
        if not columns:
            return []
        tasks = sorted({task for _, per_task in columns for task in per_task})
        width = max(len("task"), *(len(task) for task in tasks))
        lines = [f"Exact match after round {last['round']}, per task:",
                 "  " + "task".ljust(width) + "".join(f" | {title:>17}" for title, _ in columns)]
        for task in tasks:
            cells = "".join(f" | {per_task[task]:>17.1%}" if task in per_task else f" | {'-':>17}"
                            for _, per_task in columns)
            lines.append("  " + task.ljust(width) + cells)
        return lines

    def _write_metrics(self) -> None:
        document: dict[str, Any] = {
            "run-name": self.folder.name,
            "num-server-rounds": self.config.num_server_rounds,
            "rounds": self.rounds,
        }
        if self.resumed_after:
            document["resumed-after-round"] = self.resumed_after
        atomic.write_text(self.folder / METRICS, json.dumps(document, indent=2) + "\n")
