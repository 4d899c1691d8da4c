"""The evaluation's outputs: a printed table and a JSON file of figures beside the adapter.

The JSON (`evaluation-<adapter folder name>.json` in the adapter's parent folder, for a run:
`results/<run>/evaluation-adapter-final.json`) keeps one entry per suite and one for lm-eval, so
evaluating another suite adds to it and re-evaluating a suite replaces that suite's entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowertune_llm.shared import atomic
from flowertune_llm.tools.evaluation.lm_eval_bridge import primary_metric


def results_path(adapter: Path) -> Path:
    """Return the JSON file an adapter's evaluation figures go to."""
    return adapter.parent / f"evaluation-{adapter.name}.json"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def render_table(rows: list[tuple[str, int, str, float | None, float | None]], compare_base: bool) -> str:
    """Return a plain-text table of (dataset, examples, metric, score, base score) rows, scores in %."""
    header = ["dataset", "examples", "metric", "score (%)"] + (["base (%)"] if compare_base else [])
    cells = [
        [name, str(count), metric, _percent(score)] + ([_percent(base)] if compare_base else [])
        for name, count, metric, score, base in rows
    ]
    widths = [max(len(line[column]) for line in [header, *cells]) for column in range(len(header))]

    def line(values: list[str]) -> str:
        return "  ".join(value.ljust(width) if index == 0 else value.rjust(width)
                         for index, (value, width) in enumerate(zip(values, widths)))

    return "\n".join([line(header), line(["-" * width for width in widths]), *map(line, cells)])


def suite_rows(entry: dict[str, Any]) -> list[tuple[str, int, str, float | None, float | None]]:
    """Return the table rows of a suite's JSON entry, its average last."""
    metric = entry["metric"]
    rows = [
        (name, figures["examples"], metric, figures["score"], figures.get("base-score"))
        for name, figures in entry["datasets"].items()
    ]
    total = sum(figures["examples"] for figures in entry["datasets"].values())
    rows.append(("average", total, metric, entry["average"], entry.get("base-average")))
    return rows


def lm_eval_rows(entry: dict[str, Any]) -> list[tuple[str, int, str, float | None, float | None]]:
    """Return the table rows of the lm-eval JSON entry (each task's first metric)."""
    rows = []
    for task, figures in entry["tasks"].items():
        metric, value = primary_metric(figures["metrics"])
        base = figures.get("base-metrics", {}).get(metric)
        rows.append((task, figures["examples"], metric, value, base))
    return rows


def write_results(adapter: Path, header: dict[str, Any], entries: dict[str, dict[str, Any]]) -> Path:
    """Merge these entries into the adapter's results JSON (replacing same-named ones) and return its path."""
    path = results_path(adapter)
    document: dict[str, Any] = {}
    if path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            document = {}
    evaluations = {**document.get("evaluations", {}), **entries}
    document = {**header, "evaluations": evaluations}
    atomic.write_text(path, json.dumps(document, indent=2) + "\n")
    return path
