"""The few lines `flowertune run` ends with: how far the run got, its losses, where its results are.

Read from the run folder's metrics.json, so a resumed run's summary covers all its rounds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowertune_llm.server.results import FINAL_ADAPTER, METRICS

# (metrics.json key, words, whether larger is better)
_FIGURES = (
    ("train_loss", "train loss", False),
    ("eval_loss", "eval loss", False),
    ("server_eval_loss", "server eval loss", False),
    ("eval_exact_match", "eval exact match", True),
)


def read_metrics(folder: Path) -> dict[str, Any]:
    """Return a run folder's metrics.json, or an empty record when it has none yet."""
    try:
        return json.loads((folder / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _figure_lines(rounds: list[dict[str, Any]]) -> list[str]:
    lines = []
    for key, words, larger_is_better in _FIGURES:
        values = [(r["round"], r[key]) for r in rounds if isinstance(r.get(key), (int, float))]
        if not values:
            continue
        best = (max if larger_is_better else min)(values, key=lambda pair: pair[1])
        lines.append(f"  {words + ':':<18} final {values[-1][1]:.4f} (round {values[-1][0]}), "
                     f"best {best[1]:.4f} (round {best[0]})")
    return lines


def summary(folder: Path | None, wall_s: float, failed: bool) -> str:
    """Return the end-of-run summary for the run folder (None: the run never said where it wrote)."""
    lines = [f"Wall time {wall_s:.1f} s."]
    if folder is None:
        return "\n".join(lines + ["No results folder: the run stopped before the ServerApp created one."])
    metrics = read_metrics(folder)
    rounds = metrics.get("rounds", [])
    planned = metrics.get("num-server-rounds", "?")
    lines.insert(0, f"Rounds: {len(rounds)}/{planned} finished.")
    lines += _figure_lines(rounds)
    lines.append(f"Results: {folder}")
    adapter = folder / FINAL_ADAPTER
    if adapter.is_dir():
        lines.append(f"Adapter: {adapter}")
    lines.append("Next:")
    if adapter.is_dir():
        lines += [
            f"  flowertune chat {adapter} --question \"...\"",
            f"  flowertune evaluate {folder}",
        ]
    if rounds:
        lines.append(f"  flowertune plot {folder} --loss train eval")
    if failed and rounds:
        lines.append(f"  flowertune resume {folder}          # continue after round {rounds[-1]['round']}")
    elif rounds:
        more = len(rounds) + 5
        lines.append(f"  flowertune resume {folder} --num-server-rounds {more}   # train on to round {more}")
    return "\n".join(lines)
