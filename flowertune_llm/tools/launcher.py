"""`flowertune run`: `flwr run` with the app's config check first, a quiet stream and an honest end.

    flowertune run . --run-config "model.quantization=8 num-server-rounds=3"

Flower stays the engine: this builds the same `flwr run APP [SUPERLINK] --stream ...` command. What
it adds is what `flwr run` lacks for a user (flwr 1.42): the run config is checked by the app's own
`parse_config` before anything is submitted (Flower only says `[code: 15] Invalid run
configuration.`); the local SuperLink's per-run `uv sync` is off (it pulled a multi-GB CUDA torch);
only the app's round lines and errors are shown; Ctrl-C stops the run with `flwr stop` (Flower's own
Ctrl-C leaves it running); the exit status says whether the run failed (`flwr run` exits 0).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from flowertune_llm.shared.settings import AppConfig, parse_config

# What `flwr run` and the ServerApp print, with Flower's colour codes removed.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_PREFIX = re.compile(r"^(?:\(\w+[^)]*\)\s*)?(INFO|WARNING|ERROR|DEBUG|CRITICAL)\s*:\s+")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_RESULTS = re.compile(r"Results of this run go to (.+?)\s*$")
_ROUND = re.compile(r"^Round \d+/\d+:")
_DONE = "Done. Metrics:"
# The last line of a Python traceback: `package.module.SomeError: message`.
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.+)$")
# Lines shown without --verbose besides round lines and errors: where results go, a resume point.
_ALSO_SHOWN = ("Results of this run go to", "Resuming after round")
# The per-task exact-match table the server logs at the end: its title, then rows with " | " cells.
_TABLE_TITLE = "Exact match after round"
_TABLE_ROW = re.compile(r"^(task\s.*|\S.*?(\s\|\s+(\d+\.\d%|-))+)$")
DISABLE_INSTALL = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"


class LaunchError(RuntimeError):
    """The command line or app folder is unusable: nothing was submitted."""


@dataclass
class RunRequest:
    """What `flowertune run` was asked: flwr run's own arguments plus the wrapper's switches."""

    app: Path = Path(".")
    superlink: str | None = None
    run_config: list[str] = field(default_factory=list)
    flwr_arguments: list[str] = field(default_factory=list)
    verbose: bool = False
    install_dependencies: bool = False


@dataclass
class RunOutcome:
    """What the stream told: the run's id and folder, whether the app finished, its last error."""

    run_id: str | None = None
    folder: Path | None = None
    finished: bool = False
    error: str | None = None
    interrupted: bool = False
    lines: list[str] = field(default_factory=list)


def app_defaults(app: Path) -> dict[str, Any]:
    """Return the app's flat `[tool.flwr.app.config]` defaults from its pyproject.toml."""
    from flwr.common.config import flatten_dict

    pyproject = app / "pyproject.toml"
    if not pyproject.is_file():
        raise LaunchError(f"APP: '{app}' is not a Flower App folder (it has no pyproject.toml)")
    document = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    return flatten_dict(document.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def effective_run_config(app: Path, overrides: list[str]) -> dict[str, Any]:
    """Return the run config Flower would build: the app's defaults with `--run-config` applied."""
    import click
    from flwr.common.config import parse_config_args

    try:
        # Flower's own parser, so `k=v` pairs and TOML files read exactly as `flwr run` reads them.
        given = parse_config_args(overrides or None)
    except (ValueError, OSError, tomllib.TOMLDecodeError, click.ClickException) as error:
        text = error.format_message() if isinstance(error, click.ClickException) else str(error)
        raise LaunchError(f"--run-config {' '.join(overrides)!r}: {text}") from None
    return {**app_defaults(app), **given}


def check_run_config(app: Path, overrides: list[str]) -> AppConfig:
    """Validate the run config with the app's own checks; raise ConfigError naming key and value."""
    return parse_config(effective_run_config(app, overrides))


def flwr_executable() -> str:
    """Return the `flwr` of this environment (beside the running Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    found = str(beside) if beside.is_file() else shutil.which("flwr")
    if not found:
        raise LaunchError("cannot find the `flwr` command: install the app (pip install -e .) in this environment")
    return found


def flwr_environment(install_dependencies: bool) -> dict[str, str]:
    """Return the environment for `flwr`: runtime dependency installation off unless asked for."""
    env = dict(os.environ)
    if install_dependencies:
        env.pop(DISABLE_INSTALL, None)
    else:
        env[DISABLE_INSTALL] = "1"
    # `flwr run` writes to a pipe here: unbuffered, so each line arrives as Flower streams it.
    env["PYTHONUNBUFFERED"] = "1"
    # flower-superlink starts flower-superexec by name: this environment's bin must be on PATH.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def flwr_run_command(request: RunRequest) -> list[str]:
    """Return the `flwr run ... --stream` command for the request."""
    command = [flwr_executable(), "run", str(request.app)]
    if request.superlink:
        command.append(request.superlink)
    for override in request.run_config:
        command += ["--run-config", override]
    return [*command, *request.flwr_arguments, "--stream"]


def clean(line: str) -> str:
    """Return a streamed line without colour codes and Flower's log-level prefix."""
    return _LOG_PREFIX.sub("", _ANSI.sub("", line.rstrip("\n")))


def _is_error(raw: str) -> bool:
    return _LOG_PREFIX.match(_ANSI.sub("", raw)) is not None and "ERROR" in _ANSI.sub("", raw).split(":", 1)[0]


def follow(stream: Iterator[str], outcome: RunOutcome, out: TextIO, verbose: bool) -> None:
    """Read `flwr run`'s stream into `outcome`, echoing everything (verbose) or the app's lines."""
    in_table = False
    for raw in stream:
        line = clean(raw)
        outcome.lines.append(line)
        in_table = line.startswith(_TABLE_TITLE) or (in_table and _TABLE_ROW.match(line) is not None)
        if match := _RUN_ID.search(line):
            outcome.run_id = match.group(1)
        if match := _RESULTS.search(line):
            outcome.folder = Path(match.group(1))
        if line.startswith(_DONE):
            outcome.finished = True
        if match := _EXCEPTION_LINE.match(line.strip()):
            outcome.error = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
        error = _is_error(raw)
        if verbose:
            print(line, file=out, flush=True)
        elif error or in_table or _ROUND.match(line) or line.startswith(_ALSO_SHOWN):
            print(line if not error else f"error: {line}", file=out, flush=True)


def stop_run(run_id: str, request: RunRequest, env: dict[str, str]) -> bool:
    """Stop the run with `flwr stop RUN_ID [SUPERLINK]`; return whether Flower accepted it."""
    command = [flwr_executable(), "stop", run_id, *([request.superlink] if request.superlink else [])]
    stopped = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    return stopped.returncode == 0


def run_status(run_id: str, request: RunRequest, env: dict[str, str]) -> tuple[str, str]:
    """Return Flower's status of the run (e.g. `finished:failed`) and its details; '' where unreadable."""
    command = [flwr_executable(), "ls", *([request.superlink] if request.superlink else []),
               "--run-id", run_id, "--format", "json"]
    listed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(listed.stdout).get("runs", [])
    except ValueError:
        return "", ""
    return (str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))) if runs else ("", "")


def launch(request: RunRequest, out: TextIO = sys.stdout) -> tuple[int, RunOutcome]:
    """Submit the run through `flwr run --stream`, follow it, stop it on Ctrl-C; return (exit status, outcome)."""
    env = flwr_environment(request.install_dependencies)
    outcome = RunOutcome()
    # From the caller's folder, as `flwr run` typed there would run. Its own session: the terminal's
    # Ctrl-C reaches this process alone, which stops the run itself.
    process = subprocess.Popen(flwr_run_command(request), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    assert process.stdout is not None
    try:
        follow(process.stdout, outcome, out, request.verbose)
        process.wait()
    except KeyboardInterrupt:
        outcome.interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abandon the stop
        try:
            if outcome.run_id:
                stopped = stop_run(outcome.run_id, request, env)
                print(f"Interrupted: {'stopped' if stopped else 'could not stop'} run {outcome.run_id} "
                      f"(flwr stop {outcome.run_id}).", file=out, flush=True)
            else:
                print("Interrupted before Flower started a run: nothing was submitted.", file=out, flush=True)
        finally:
            process.terminate()
            process.wait()
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return 130, outcome
    if process.returncode != 0:
        return process.returncode, outcome
    status, details = run_status(outcome.run_id, request, env) if outcome.run_id else ("", "")
    failed = status.endswith(("failed", "stopped")) or not outcome.finished
    if failed and outcome.error is None and details not in ("", "N/A"):
        outcome.error = details
    return (1 if failed else 0), outcome
