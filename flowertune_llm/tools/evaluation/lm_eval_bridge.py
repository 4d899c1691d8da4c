"""Hand a loaded adapter to EleutherAI's lm-evaluation-harness, for any task it knows or a user's YAML.

The harness's `HFLM` wraps the already-loaded PeftModel (quantized base plus adapter), so lm-eval
runs the very model the suites run instead of loading its own copy. Tasks are looked up in the
harness's task index, extended with `--lm-eval-include PATH` (a folder or a task YAML) for tasks
defined on local files. Install with `pip install -e ".[eval]"`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

INSTALL_HINT = 'lm-evaluation-harness is not installed: pip install -e ".[eval]" (or pip install lm-eval)'


class LmEvalError(ValueError):
    """lm-eval is missing, a task name is unknown, or an include path is unusable."""


def task_manager(include: Path | None) -> Any:
    """Return lm-eval's task index, with the tasks defined under `include` added."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise LmEvalError(INSTALL_HINT) from error
    if include is not None and not include.exists():
        raise LmEvalError(f"--lm-eval-include: '{include}' does not exist (give a task YAML or a folder of them)")
    # TaskManager indexes folders: a single YAML is included through its folder.
    folder = include.parent if include is not None and include.is_file() else include
    return TaskManager(include_path=str(folder) if folder is not None else None, verbosity="ERROR")


def check_tasks(names: list[str], manager: Any) -> None:
    """Refuse task names lm-eval does not know, suggesting close ones."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise LmEvalError(
                f"--lm-eval: task '{name}' is not known to lm-eval{hint}. "
                "List tasks with `lm-eval ls tasks`; for a task of your own pass --lm-eval-include PATH."
            )


# Bookkeeping numbers lm-eval reports beside the metrics.
NOT_METRICS = {"sample_len", "samples"}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """Return a task's numeric metrics ('acc,none' -> 'acc'; stderr kept as 'acc_stderr')."""
    return {
        key.split(",")[0]: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key.split(",")[0] not in NOT_METRICS
    }


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    names: list[str],
    manager: Any,
    limit: int | None,
    batch_size: int,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval's tasks on the loaded model; return {task: {examples, metrics}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(
        model=wrapped, tasks=names, task_manager=manager, limit=limit, log_samples=False,
        bootstrap_iters=0, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
    )
    counts = output.get("n-samples", {})
    return {
        task: {
            "examples": int(counts.get(task, {}).get("effective", 0)),
            "metrics": _numbers(metrics),
        }
        for task, metrics in output["results"].items()
    }


def primary_metric(metrics: dict[str, float]) -> tuple[str, float]:
    """Return the task's first reported metric that is not a standard error (for the table)."""
    for name, value in metrics.items():
        if not name.endswith("_stderr"):
            return name, value
    return "", float("nan")


def version() -> str:
    """Return the installed lm-eval version, for the results JSON."""
    from importlib.metadata import version as installed

    return installed("lm_eval")
