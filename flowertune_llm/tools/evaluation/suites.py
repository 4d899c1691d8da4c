"""The one registry of evaluation suites, their benchmarks and the datasets those read.

Validation, `--help` text, loading and running all read these tables, so a dataset is added in one
place. Hub ids, configs and splits are the FlowerTune reference's; `columns` are the fields of
each dataset's public schema that the prompts use (what a `--data NAME=PATH` file must have).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flowertune_llm.tools.evaluation import prompts
from flowertune_llm.tools.evaluation.prompts import Example

# MMLU's subjects in the reference's three leaderboard categories (its fourth, "other", is unranked).
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
        "high_school_physics", "high_school_statistics", "machine_learning",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies", "sociology",
        "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
        "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
        "world_religions",
    ),
}


@dataclass(frozen=True)
class DataSource:
    """A dataset as published: where the hub has it and which of its columns the prompts read."""

    name: str
    hub_id: str
    hub_config: str | None
    split: str
    columns: tuple[str, ...]
    # One hub config per MMLU subject: the source is read subject by subject.
    per_subject: bool = False
    # The reference's selection after loading: concatenate these splits, then keep a seeded
    # 25% test split (FPB, FiQA); an empty `concat` with `test_fraction` splits `split` itself.
    concat: tuple[str, ...] = ()
    test_fraction: float = 0.0
    revision: str | None = None


@dataclass(frozen=True)
class Benchmark:
    """One scored row of a suite: a source, how its rows become examples, and how they are judged."""

    name: str
    source: str
    to_example: Callable[[dict], Example]
    # 'mcq' or 'boolean' (first letter / yes-no word), 'sentiment', or a language for code.
    answer_type: str
    # The MMLU subjects this row pools (empty: every row of the source).
    subjects: tuple[str, ...] = ()
    # Code: the bigcode harness's --max_length_generation (prompt + completion, in tokens).
    max_length: int = 0


@dataclass(frozen=True)
class Suite:
    """A leaderboard domain: its benchmarks, its metric and the base precision the reference uses."""

    name: str
    benchmarks: tuple[Benchmark, ...]
    metric: str
    # 4: the reference loads the base in 4 bits; 16: unquantized (the code harness uses fp32).
    reference_bits: int


SOURCES: dict[str, DataSource] = {
    source.name: source
    for source in (
        DataSource("mmlu", "lukaemon/mmlu", None, "test", ("input", "A", "B", "C", "D", "target"), per_subject=True),
        DataSource("fpb", "takala/financial_phrasebank", "sentences_50agree", "train", ("sentence", "label"),
                   test_fraction=0.25),
        DataSource("fiqa", "pauri32/fiqa-2018", None, "train", ("sentence", "sentiment_score", "format"),
                   concat=("train", "validation", "test"), test_fraction=0.25),
        DataSource("tfns", "zeroshot/twitter-financial-news-sentiment", None, "validation", ("text", "label")),
        DataSource("pubmedqa", "bigbio/pubmed_qa", "pubmed_qa_labeled_fold0_source", "test",
                   ("QUESTION", "CONTEXTS", "final_decision")),
        DataSource("medmcqa", "medmcqa", None, "validation", ("question", "opa", "opb", "opc", "opd", "cop")),
        DataSource("medqa", "bigbio/med_qa", "med_qa_en_4options_source", "test", ("question", "answer", "options")),
        DataSource("careqa", "HPAI-BSC/CareQA", "CareQA_en", "test", ("question", "op1", "op2", "op3", "op4", "cop")),
        DataSource("mbpp", "mbpp", None, "test", ("text", "test_list")),
        DataSource("humaneval", "openai_humaneval", None, "test", ("prompt", "test", "entry_point")),
        DataSource("multiple-js", "nuprl/MultiPL-E", "humaneval-js", "test", ("name", "prompt", "tests", "stop_tokens"),
                   revision="ff5c146da05f10bc69b9ce393b77f381b3825d1b"),
        DataSource("multiple-cpp", "nuprl/MultiPL-E", "humaneval-cpp", "test", ("name", "prompt", "tests", "stop_tokens"),
                   revision="ff5c146da05f10bc69b9ce393b77f381b3825d1b"),
    )
}

SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite("general-nlp", tuple(
            Benchmark(f"mmlu-{category.replace('_', '-')}", "mmlu", prompts.mmlu, "mcq", subjects=subjects)
            for category, subjects in MMLU_CATEGORIES.items()
        ), "accuracy", 4),
        Suite("finance", (
            Benchmark("fpb", "fpb", prompts.fpb, "sentiment"),
            Benchmark("fiqa", "fiqa", prompts.fiqa, "sentiment"),
            Benchmark("tfns", "tfns", prompts.tfns, "sentiment"),
        ), "accuracy", 4),
        Suite("medical", (
            Benchmark("pubmedqa", "pubmedqa", prompts.pubmedqa, "boolean"),
            Benchmark("medmcqa", "medmcqa", prompts.medmcqa, "mcq"),
            Benchmark("medqa", "medqa", prompts.medqa, "mcq"),
            Benchmark("careqa", "careqa", prompts.careqa, "mcq"),
        ), "accuracy", 4),
        # max_length: the reference's commands (1024; 2048 for MBPP, whose prompts are longer).
        Suite("code", (
            Benchmark("mbpp", "mbpp", prompts.mbpp, "python", max_length=2048),
            Benchmark("humaneval", "humaneval", prompts.humaneval, "python", max_length=1024),
            Benchmark("multiple-js", "multiple-js", prompts.multipl_e, "javascript", max_length=1024),
            Benchmark("multiple-cpp", "multiple-cpp", prompts.multipl_e, "cpp", max_length=1024),
        ), "pass@1", 16),
    )
}


def sources_of(suite: Suite) -> tuple[str, ...]:
    """Return the names of the data sources a suite reads, in order, each once."""
    return tuple(dict.fromkeys(benchmark.source for benchmark in suite.benchmarks))


def describe() -> str:
    """Return one line per suite naming its benchmarks and the --data names it reads (for --help)."""
    return "; ".join(
        f"{name}: {', '.join(b.name for b in suite.benchmarks)} (--data {', '.join(sources_of(suite))})"
        for name, suite in SUITES.items()
    )
