"""The `flowertune` command: one entry point whose subcommands are the app's user tools.

    flowertune run . --run-config "model.quantization=8"      # flwr run, checked, quiet, stoppable
    flowertune resume results/<run> --num-server-rounds 10     # continue with the run's own settings
    flowertune plot results/<run-a> results/<run-b> --loss train eval
    flowertune evaluate results/<run> --suite finance --data fpb=fpb.jsonl --limit 100
    flowertune evaluate results/<run>/adapter-final --lm-eval hellaswag,arc_easy

Each subcommand registers itself in `SUBCOMMANDS` (name -> function adding its parser); a new one
(run, resume, plot, chat, ...) adds a function there and sets `handler` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from flowertune_llm.tools.evaluation import suites


def _data_argument(text: str) -> tuple[str, Path]:
    """Parse one --data NAME=PATH."""
    name, separator, path = text.partition("=")
    if not separator or not name or not path:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=PATH (e.g. mmlu=./mmlu or fpb=fpb.jsonl)")
    return name.strip(), Path(path).expanduser()


def _evaluate(args: argparse.Namespace) -> int:
    """Run `flowertune evaluate`; turn a bad input into one message and exit status 2."""
    from flowertune_llm.tools.evaluation.runner import EvaluationInputError, Request, evaluate
    from flowertune_llm.tools.evaluation.sources import DataError

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
    parser.add_argument("--limit", type=int, default=None,
                        help="first N examples of each dataset (a quick look; not leaderboard figures)")
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


def _flwr_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of `flwr run` that the wrapper passes on, and its own switches."""
    parser.add_argument("superlink", nargs="?", default=None, help="SuperLink connection (flwr run's; default: local)")
    parser.add_argument("--federation", default=None, help="federation ID, `@<account>/<name>` (flwr run's)")
    parser.add_argument("--federation-config", action="append", default=[], metavar="CONFIG",
                        help='simulation settings, e.g. "num-supernodes=4" (flwr run\'s)')
    parser.add_argument("--stream", action="store_true", help="accepted for flwr run's sake; the run always streams")
    parser.add_argument("--verbose", action="store_true", help="print Flower's whole log, not only round lines and errors")
    parser.add_argument("--install-dependencies", action="store_true",
                        help="let the local SuperLink `uv sync` the app's dependencies for the run (off by default: "
                        "it installs a CUDA torch even on a CPU machine). Only a SuperLink started by this run obeys")


def _request(args: argparse.Namespace, app: Path, run_config: list[str]):
    """Return the launcher's request for the parsed `run`/`resume` arguments."""
    from flowertune_llm.tools.launcher import RunRequest

    passed = [*(["--federation", args.federation] if args.federation else [])]
    for setting in args.federation_config:
        passed += ["--federation-config", setting]
    return RunRequest(app=app, superlink=args.superlink, run_config=run_config, flwr_arguments=passed,
                      verbose=args.verbose, install_dependencies=args.install_dependencies)


def _launch_checked(request) -> int:
    """Check the run config, submit the run, follow it, print the summary; return the exit status."""
    from flowertune_llm.server.run_summary import summary
    from flowertune_llm.shared.settings import ConfigError
    from flowertune_llm.tools.launcher import LaunchError, check_run_config, launch

    try:
        check_run_config(request.app, request.run_config)
    except (ConfigError, LaunchError) as error:
        print(f"error: {error}\nNothing was submitted.", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        status, outcome = launch(request)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = status != 0
    if failed and status != 130 and not request.verbose and outcome.error is None:
        # No Python error in the stream (Flower itself failed): show the end of its log.
        print("\n".join(outcome.lines[-20:]), file=sys.stderr)
    print(summary(outcome.folder, time.monotonic() - started, failed))
    if failed and status != 130:
        print(f"error: {outcome.error or 'the run failed (see above; --verbose shows the whole log)'}", file=sys.stderr)
    return status


def _run(args: argparse.Namespace) -> int:
    """Run `flowertune run`."""
    return _launch_checked(_request(args, args.app, args.run_config))


def add_run(commands: argparse._SubParsersAction) -> None:
    """Add `flowertune run`."""
    parser = commands.add_parser(
        "run", help="flwr run, with the app's config check first, quiet output and Ctrl-C that stops the run",
        description="Run the app with `flwr run APP [SUPERLINK] --stream`. The run config is checked by the app "
        "before anything is submitted; the local SuperLink's runtime dependency installation is off; only round "
        "lines and errors are printed; Ctrl-C stops the run (flwr stop); the exit status is 1 when the run failed.",
    )
    parser.add_argument("app", nargs="?", type=Path, default=Path("."), metavar="APP", help="the app folder (default .)")
    parser.add_argument("--run-config", "-c", action="append", default=[], metavar="CONFIG",
                        help='"key=value ..." overrides, or one TOML file (flwr run\'s)')
    _flwr_run_arguments(parser)
    parser.set_defaults(handler=_run)


def _resume(args: argparse.Namespace) -> int:
    """Run `flowertune resume`: the run's saved settings, written to a TOML file outside the app folder."""
    from flowertune_llm.server.results import to_toml
    from flowertune_llm.server.resume import ResumeError, continuation_config, find_resume_point
    from flowertune_llm.shared.settings import ConfigError, parse_config

    try:
        settings = continuation_config(args.run_folder, args.num_server_rounds)
        # The ServerApp checks this too, but only after the run has started (~20 s): say it now.
        point = find_resume_point(parse_config(settings))
        if point.round >= settings["num-server-rounds"]:
            raise ResumeError(f"the run in '{args.run_folder}' has finished all {point.round} of its rounds; "
                              f"--num-server-rounds {point.round + 5} (say) trains on")
    except (ResumeError, ConfigError) as error:
        print(f"error: {error}\nNothing was submitted.", file=sys.stderr)
        return 2
    # Outside the app folder: every file there is bundled into the run's FAB.
    with tempfile.TemporaryDirectory(prefix="flowertune-resume-") as scratch:
        config_file = Path(scratch) / "run-config.toml"
        config_file.write_text(to_toml(settings), encoding="utf-8")
        return _launch_checked(_request(args, args.app, [str(config_file)]))


def add_resume(commands: argparse._SubParsersAction) -> None:
    """Add `flowertune resume`."""
    parser = commands.add_parser(
        "resume", help="continue a run from its results folder with its own saved settings",
        description="Continue the run in RUN_FOLDER after its last finished round, with the settings saved in its "
        "run-config.toml (nothing to restate). --num-server-rounds N trains on to round N.",
    )
    parser.add_argument("run_folder", type=Path, metavar="RUN_FOLDER", help="the run's folder, results/<run>")
    parser.add_argument("--num-server-rounds", type=int, default=None, metavar="N", help="the run's new total of rounds")
    parser.add_argument("--app", type=Path, default=Path("."), help="the app folder (default .)")
    _flwr_run_arguments(parser)
    parser.set_defaults(handler=_resume)


# Tools that keep their own parsers: `flowertune NAME ...` hands the rest of the line to its main.
DELEGATED: dict[str, tuple[str, str]] = {
    "plot": ("flowertune_llm.tools.plot", "plot loss over rounds from runs' metrics.json"),
    "chat": ("flowertune_llm.tools.chat", "answer one instruction with a saved adapter"),
    "export": ("flowertune_llm.tools.export", "merge an adapter into its base model (written under results/)"),
    "memory-report": ("flowertune_llm.tools.memory_report", "peak memory of one client per setting"),
    "deploy": ("flowertune_llm.tools.local_deployment", "a local SuperLink and SuperNodes: deploy up / deploy down"),
    "credentials": ("flowertune_llm.tools.credentials", "a CA, a SuperLink TLS certificate and SuperNode keys"),
}


def run_delegated(name: str, argv: list[str]) -> int:
    """Run a delegated tool's main with the rest of the command line; return its exit status."""
    module = importlib.import_module(DELEGATED[name][0])
    status = module.main(argv)
    return status if isinstance(status, int) else 0


def add_delegated(commands: argparse._SubParsersAction) -> None:
    """List the delegated tools in `flowertune --help` (main hands them their arguments unparsed)."""
    for name, (_, help_text) in DELEGATED.items():
        commands.add_parser(name, help=help_text, add_help=False)


SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "run": add_run, "resume": add_resume, "evaluate": add_evaluate, "tools": add_delegated,
}


def build_parser() -> argparse.ArgumentParser:
    """Return the `flowertune` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="flowertune", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand; return its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return run_delegated(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
