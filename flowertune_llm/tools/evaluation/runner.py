"""`flowertune evaluate`: check every input, load the adapter once, run the suite and lm-eval, report.

Everything a user can get wrong (suite, dataset names, --data files and their columns, the adapter
folder, the base model's reachability, lm-eval task names, code execution consent) is checked in
`plan` before any model is loaded; nothing is written unless the whole evaluation finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from flowertune_llm.client.model import ModelSourceError, load_inference_base, resolve_model_path
from flowertune_llm.server.results import FINAL_ADAPTER
from flowertune_llm.shared.adapter_card import AdapterError, base_model_of, read_card
from flowertune_llm.tools.evaluation import generation, lm_eval_bridge, report, sandbox, scoring, sources
from flowertune_llm.tools.evaluation.prompts import Example, RowError
from flowertune_llm.tools.evaluation.suites import SOURCES, SUITES, Benchmark, Suite, sources_of

PROTOCOL = "FlowerTune LLM leaderboard (flwrlabs/flower benchmarks/flowertune-llm/evaluation), reproduced"
# The reference loads the base with torch_dtype=float32 for 4-bit and for the code harness (fp32).
LOAD_DTYPE = torch.float32


class EvaluationInputError(ValueError):
    """An argument of `flowertune evaluate` is wrong; the message names it, its value and what is accepted."""


@dataclass(frozen=True)
class Request:
    """What the user asked for, as parsed from the command line."""

    adapter: Path
    suite: str | None = None
    data: dict[str, Path] = field(default_factory=dict)
    limit: int | None = None
    quantization: int | None = None
    compare_base: bool = False
    allow_code_execution: bool = False
    lm_eval_tasks: tuple[str, ...] = ()
    lm_eval_include: Path | None = None
    lm_eval_batch_size: int = 1
    base: str | None = None
    # Code: the bigcode harness's --max_length_generation; None = the reference's (1024, MBPP 2048).
    max_length_generation: int | None = None


@dataclass
class Plan:
    """A checked request: the adapter, its base, the examples of every benchmark, the lm-eval tasks."""

    adapter: Path
    base_model: str
    bits: int
    suite: Suite | None
    examples: dict[str, list[Example]]
    sources: dict[str, str]
    lm_eval_manager: Any = None


def resolve_adapter(path: Path) -> Path:
    """Return the adapter folder: `path` itself, or a run folder's final adapter."""
    if not path.exists():
        raise EvaluationInputError(f"ADAPTER: '{path}' does not exist; give an adapter folder or a run folder (results/<run>)")
    if (path / FINAL_ADAPTER).is_dir() and not (path / "adapter_config.json").is_file():
        return path / FINAL_ADAPTER
    return path


def check_base_reachable(name: str) -> None:
    """Refuse a base model whose config cannot be read here (offline and not cached, a typo)."""
    try:
        AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError, ModelSourceError) as error:
        raise EvaluationInputError(
            f"base model: '{name}' cannot be loaded: it is not a local model folder and the Hugging Face Hub "
            "did not provide it (offline, not in the cache, private, or a typo). Download it where the hub is "
            f"reachable and pass --base FOLDER. Cause: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error


def _check_suite(request: Request) -> Suite | None:
    """Return the requested suite, refusing an unknown one, stray --data names or unconsented code runs."""
    if request.suite is None:
        if request.data:
            raise EvaluationInputError("--data: only used with --suite (which suite are these datasets for?)")
        if not request.lm_eval_tasks:
            raise EvaluationInputError(f"give --suite ({', '.join(SUITES)}) or --lm-eval TASKS, or both")
        return None
    suite = SUITES.get(request.suite)
    if suite is None:
        raise EvaluationInputError(f"--suite: '{request.suite}' is not a suite; accepted: {', '.join(SUITES)}")
    accepted = sources_of(suite)
    for name in request.data:
        if name not in accepted:
            raise EvaluationInputError(
                f"--data: '{name}' is not a dataset of suite {suite.name}; accepted: {', '.join(accepted)}"
            )
    languages = {b.answer_type for b in suite.benchmarks if b.answer_type in sandbox.TIME_LIMITS_S}
    if languages and not request.allow_code_execution:
        raise EvaluationInputError(
            f"--suite {suite.name}: scoring runs the programs the model writes, which is only done with "
            "--allow-code-execution. Each then runs in a subprocess with a time limit (3 s Python, 5 s "
            "JavaScript, 15 s C++) and a 4 GiB memory limit; that is not a security sandbox, so use a "
            "container or VM for untrusted adapters."
        )
    missing = sandbox.missing_tools(languages)
    if missing:
        raise EvaluationInputError(
            f"--suite {suite.name}: {', '.join(missing)} not found on PATH (MultiPL-E's JavaScript runs with "
            "node, its C++ compiles with g++); install them first"
        )
    return suite


def _load_examples(suite: Suite, request: Request) -> tuple[dict[str, list[Example]], dict[str, str]]:
    """Load every source the suite reads and turn its rows into each benchmark's examples."""
    rows_of: dict[str, list[dict]] = {}
    described: dict[str, str] = {}
    for name in sources_of(suite):
        path = request.data.get(name)
        rows_of[name] = sources.load_rows(SOURCES[name], path)
        described[name] = sources.describe_source(SOURCES[name], path)
    examples: dict[str, list[Example]] = {}
    for benchmark in suite.benchmarks:
        rows = rows_of[benchmark.source]
        if benchmark.subjects:
            rows = [row for row in rows if row["subject"] in benchmark.subjects]
        if not rows:
            raise EvaluationInputError(
                f"--data {benchmark.source}: no examples for {benchmark.name} (for MMLU: a file for at least "
                f"one of its subjects, e.g. {benchmark.subjects[0] if benchmark.subjects else ''}.jsonl)"
            )
        rows = rows[: request.limit] if request.limit is not None else rows
        try:
            examples[benchmark.name] = [benchmark.to_example(row) for row in rows]
        except (RowError, KeyError, TypeError, ValueError) as error:
            raise EvaluationInputError(f"dataset {benchmark.source}: a row cannot be read: {error}") from error
    return examples, {b.name: described[b.source] for b in suite.benchmarks}


def plan(request: Request) -> Plan:
    """Check the whole request and load the datasets, loading no model; raise with a clear message."""
    if request.limit is not None and request.limit < 1:
        raise EvaluationInputError(f"--limit: must be >= 1, got {request.limit}")
    if request.max_length_generation is not None and request.max_length_generation < 1:
        raise EvaluationInputError(f"--max-length-generation: must be >= 1, got {request.max_length_generation}")
    suite = _check_suite(request)
    adapter = resolve_adapter(request.adapter)
    try:
        base = request.base or base_model_of(adapter, read_card(adapter))
    except AdapterError as error:
        raise EvaluationInputError(f"ADAPTER: {error}") from error
    manager = None
    if request.lm_eval_tasks:
        try:
            manager = lm_eval_bridge.task_manager(request.lm_eval_include)
            lm_eval_bridge.check_tasks(list(request.lm_eval_tasks), manager)
        except lm_eval_bridge.LmEvalError as error:
            raise EvaluationInputError(str(error)) from error
    elif request.lm_eval_include is not None:
        raise EvaluationInputError("--lm-eval-include: only used with --lm-eval TASKS")
    examples, described = _load_examples(suite, request) if suite else ({}, {})
    check_base_reachable(base)
    bits = request.quantization or (suite.reference_bits if suite else 4)
    return Plan(adapter, base, bits, suite, examples, described, manager)


def load_model(plan: Plan) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """Load the base as planned with the adapter on top, and its tokenizer (given a pad token)."""
    source = resolve_model_path(plan.base_model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = PeftModel.from_pretrained(load_inference_base(plan.base_model, plan.bits, dtype=LOAD_DTYPE), plan.adapter)
    model.eval()
    return model, tokenizer


def score_benchmark(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    benchmark: Benchmark,
    examples: list[Example],
    max_length_generation: int | None = None,
) -> float:
    """Generate the model's answers to a benchmark's examples and return its score (accuracy or pass@1)."""
    if benchmark.answer_type in ("mcq", "boolean"):
        outputs = generation.generate_choices(model, tokenizer, examples)
        correct = [scoring.choice_is_correct(out, ex.gold, benchmark.answer_type) for out, ex in zip(outputs, examples)]
    elif benchmark.answer_type == "sentiment":
        answers = generation.generate_finance(model, tokenizer, examples)
        correct = [scoring.sentiment_is_correct(answer, ex.gold) for answer, ex in zip(answers, examples)]
    else:
        programs = generation.generate_code(model, tokenizer, examples, max_length_generation or benchmark.max_length)
        # pass@1 from one sample per problem is the share of problems whose program passes.
        correct = [
            sandbox.run_program(benchmark.answer_type, program + "\n" + ex.tests).passed
            for program, ex in zip(programs, examples)
        ]
    return scoring.accuracy(correct)


def _suite_entry(plan: Plan, model: PeftModel, tokenizer: PreTrainedTokenizerBase, request: Request) -> dict[str, Any]:
    """Score every benchmark of the planned suite (and the bare base, if asked); return its JSON entry."""
    suite, compare_base, length = plan.suite, request.compare_base, request.max_length_generation
    datasets: dict[str, dict[str, Any]] = {}
    for benchmark in suite.benchmarks:
        examples = plan.examples[benchmark.name]
        figures: dict[str, Any] = {"examples": len(examples), "source": plan.sources[benchmark.name]}
        figures["score"] = score_benchmark(model, tokenizer, benchmark, examples, length)
        if compare_base:
            with model.disable_adapter():
                figures["base-score"] = score_benchmark(model, tokenizer, benchmark, examples, length)
        datasets[benchmark.name] = figures
    entry: dict[str, Any] = {
        "protocol": PROTOCOL, "metric": suite.metric, "date": _now(), "base-model": plan.base_model,
        "quantization": plan.bits, "limit": request.limit, "datasets": datasets,
        "average": scoring.suite_average([figures["score"] for figures in datasets.values()]),
    }
    if suite.metric == "pass@1":
        entry["max-length-generation"] = length or {b.name: b.max_length for b in suite.benchmarks}
    if compare_base:
        entry["base-average"] = scoring.suite_average([figures["base-score"] for figures in datasets.values()])
    return entry


def _lm_eval_entry(plan: Plan, model: PeftModel, tokenizer: PreTrainedTokenizerBase, request: Request) -> dict[str, Any]:
    """Run the lm-eval tasks on the adapter (and the bare base, if asked); return the JSON entry."""
    names = list(request.lm_eval_tasks)

    def run() -> dict[str, dict[str, Any]]:
        return lm_eval_bridge.evaluate_tasks(
            model, tokenizer, names, plan.lm_eval_manager, request.limit, request.lm_eval_batch_size
        )

    tasks = run()
    if request.compare_base:
        with model.disable_adapter():
            for task, figures in run().items():
                tasks.setdefault(task, {"examples": figures["examples"], "metrics": {}})["base-metrics"] = figures["metrics"]
    return {
        "date": _now(), "base-model": plan.base_model, "quantization": plan.bits, "limit": request.limit,
        "lm-eval-version": lm_eval_bridge.version(),
        "include-path": str(request.lm_eval_include.resolve()) if request.lm_eval_include else None,
        "tasks": tasks,
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def evaluate(request: Request, say: Callable[[str], None] = print) -> Path:
    """Run the whole evaluation; print the tables; write and return the results JSON."""
    checked = plan(request)
    say(f"Evaluating {checked.adapter} on {checked.base_model} ({checked.bits}-bit)")
    model, tokenizer = load_model(checked)
    entries: dict[str, dict[str, Any]] = {}
    if checked.suite is not None:
        entries[checked.suite.name] = _suite_entry(checked, model, tokenizer, request)
        say(f"\n{checked.suite.name} ({checked.suite.metric})")
        say(report.render_table(report.suite_rows(entries[checked.suite.name]), request.compare_base))
    if request.lm_eval_tasks:
        entries["lm-eval"] = _lm_eval_entry(checked, model, tokenizer, request)
        say("\nlm-evaluation-harness")
        say(report.render_table(report.lm_eval_rows(entries["lm-eval"]), request.compare_base))
    identity = {"adapter": str(checked.adapter.resolve()), "base-model": checked.base_model}
    path = report.write_results(checked.adapter, identity, entries)
    say(f"\nFigures written to {path}")
    return path
