"""The `flowertune` command: one entry point whose subcommands are the app's user tools.

    flowertune evaluate results/<run> --suite finance --data fpb=fpb.jsonl --limit 100
    flowertune evaluate results/<run>/adapter-final --lm-eval hellaswag,arc_easy

Each subcommand registers itself in `SUBCOMMANDS` (name -> function adding its parser); a new one
(run, resume, plot, chat, ...) adds a function there and sets `handler` on its parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from flowertune_llm.evaluation import suites


def _data_argument(text: str) -> tuple[str, Path]:
    """Parse one --data NAME=PATH."""
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=PATH (e.g. mmlu=./mmlu or fpb=fpb.jsonl)")
    return name.strip(), Path(path).expanduser()


def _evaluate(args: argparse.Namespace) -> int:
    """Run `flowertune evaluate`; turn a bad input into one message and exit status 2."""
    from flowertune_llm.evaluation.runner import EvaluationInputError, Request, evaluate
    from flowertune_llm.evaluation.sources import DataError

    data: dict[str, Path] = {}
    for name, path in args.data:
        if name in data:
            print(f"error: --data: '{name}' given twice", file=sys.stderr)
            return 2
        data[name] = path
    tasks = tuple(task.strip() for task in (args.lm_eval or "").split(",") if task.strip())
    request = Request(
        adapter=args.adapter, suite=args.suite, data=data, limit=args.limit, quantization=args.quantization,
        compare_base=args.compare_base, allow_code_execution=args.allow_code_execution, lm_eval_tasks=tasks,
        lm_eval_include=args.lm_eval_include, lm_eval_batch_size=args.lm_eval_batch_size, base=args.base or None,
        max_length_generation=args.max_length_generation,
    )
    try:
        evaluate(request)
    except (EvaluationInputError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def add_evaluate(commands: argparse._SubParsersAction) -> None:
    """Add `flowertune evaluate`."""
    parser = commands.add_parser(
        "evaluate", help="score an adapter on a FlowerTune leaderboard suite or lm-eval tasks",
        description="Score a trained adapter as the FlowerTune LLM leaderboard does (zero-shot, on the base "
        "the reference uses), and/or through lm-evaluation-harness. Figures are printed and written to "
        "evaluation-<adapter>.json beside the adapter. Suites: " + suites.describe() + ".",
    )
    parser.add_argument("adapter", type=Path, metavar="ADAPTER",
                        help="a saved adapter folder, or a run folder results/<run> (then its adapter-final)")
    # No argparse `choices`: the runner's check names the value and the accepted ones in one message.
    parser.add_argument("--suite", help="leaderboard domain: " + ", ".join(suites.SUITES))
    parser.add_argument("--data", type=_data_argument, action="append", default=[], metavar="NAME=PATH",
                        help="read dataset NAME from a local file or folder in its public schema instead of the hub")
    parser.add_argument("--limit", type=int, default=None, help="first N examples of each dataset (a quick look; not leaderboard figures)")
    parser.add_argument("--quantization", type=int, choices=(4, 8, 16), default=None,
                        help="base model bits; 16 = unquantized (float32). Default: the reference's (4; code: 16)")
    parser.add_argument("--compare-base", action="store_true", help="also score the base model without the adapter")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="let the code suite run the generated programs (subprocesses with time and memory limits)")
    parser.add_argument("--max-length-generation", type=int, default=None, metavar="N",
                        help="code: prompt + completion tokens (the bigcode harness's flag); default 1024, MBPP 2048")
    parser.add_argument("--lm-eval", metavar="TASKS", default="", help="comma-separated lm-evaluation-harness tasks")
    parser.add_argument("--lm-eval-include", type=Path, default=None, metavar="PATH",
                        help="a task YAML (or a folder of them) to add to lm-eval's tasks")
    parser.add_argument("--lm-eval-batch-size", type=int, default=1, help="lm-eval batch size")
    parser.add_argument("--base", default="", help="base model (hub id or folder); default: the adapter's")
    parser.set_defaults(handler=_evaluate)


SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {"evaluate": add_evaluate}


def build_parser() -> argparse.ArgumentParser:
    """Return the `flowertune` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="flowertune", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand; return its exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
