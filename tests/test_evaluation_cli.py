"""`flowertune evaluate` end to end on a finished default run, and its refusals of bad input.

Each dataset is written here as a small local file in its public schema (the hub is not reached).
The tiny model's scores are whatever they are; the counts, the table and the JSON are checked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import datasets
import pytest

from flowertune_llm.shared.adapter_card import CARD_FILE
from flowertune_llm.tools import cli
from flowertune_llm.tools.evaluation import runner

REPO_ROOT = Path(__file__).resolve().parent.parent


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _mmlu_question(number: int, target: str) -> dict:
    return {"input": f"Which word means {number}", "A": "one", "B": "two", "C": "three", "D": "four", "target": target}


def _fiqa_row(number: int) -> dict:
    return {
        "sentence": f"Stock {number} moved", "snippets": "moved", "target": "Stock", "aspects": "Stock/Price",
        "sentiment_score": (number - 4) / 10, "format": "post" if number % 2 else "headline",
    }


@pytest.fixture(scope="session")
def suite_data(tmp_path_factory) -> dict[str, Path]:
    """Write every dataset as a small local file (or folder) in its public schema; return NAME -> path."""
    folder = tmp_path_factory.mktemp("suite-data")
    data: dict[str, Path] = {}
    # MMLU: one file per subject; business_ethics is in the reference's unranked "other" category.
    data["mmlu"] = folder / "mmlu"
    _jsonl(data["mmlu"] / "abstract_algebra.jsonl", [_mmlu_question(1, "A"), _mmlu_question(2, "B")])
    _jsonl(data["mmlu"] / "econometrics.jsonl", [_mmlu_question(3, "C"), _mmlu_question(4, "D")])
    _jsonl(data["mmlu"] / "formal_logic.jsonl", [_mmlu_question(1, "A")])
    _jsonl(data["mmlu"] / "business_ethics.jsonl", [_mmlu_question(2, "B")])
    data["fpb"] = _jsonl(folder / "fpb.jsonl", [{"sentence": f"Sales changed by {i} percent.", "label": i % 3} for i in range(8)])
    data["fiqa"] = folder / "fiqa"
    _jsonl(data["fiqa"] / "train.jsonl", [_fiqa_row(i) for i in range(4)])
    _jsonl(data["fiqa"] / "validation.jsonl", [_fiqa_row(i) for i in (4, 5)])
    _jsonl(data["fiqa"] / "test.jsonl", [_fiqa_row(i) for i in (6, 7)])
    data["tfns"] = folder / "tfns.csv"
    data["tfns"].write_text("text,label\nShares soar,1\nShares sink,0\nShares flat,2\n", encoding="utf-8")
    data["pubmedqa"] = _jsonl(folder / "pubmedqa.jsonl", [
        {"QUESTION": f"Does drug {i} help?", "CONTEXTS": ["A trial.", "Results."], "LONG_ANSWER": "It does.",
         "final_decision": decision}
        for i, decision in enumerate(["yes", "no", "maybe"])
    ])
    data["medmcqa"] = _jsonl(folder / "medmcqa.jsonl", [
        {"question": f"Organ {i}?", "opa": "heart", "opb": "lung", "opc": "liver", "opd": "skin", "cop": i}
        for i in range(3)
    ])
    options = [{"key": key, "value": value} for key, value in zip("ABCD", ["aspirin", "insulin", "heparin", "statin"])]
    data["medqa"] = _jsonl(folder / "medqa.jsonl", [
        {"question": "First drug?", "answer": "aspirin", "options": options},
        {"question": "Second drug?", "answer": "statin", "options": options},
    ])
    data["careqa"] = folder / "careqa.parquet"
    datasets.Dataset.from_list([
        {"question": "Nurse task?", "op1": "wash", "op2": "dress", "op3": "feed", "op4": "rest", "cop": 2},
        {"question": "Dose?", "op1": "1 mg", "op2": "2 mg", "op3": "3 mg", "op4": "4 mg", "cop": 4},
    ]).to_parquet(str(data["careqa"]))
    data["mbpp"] = _jsonl(folder / "mbpp.jsonl", [
        {"task_id": 1, "text": "Write a function to add two numbers.", "code": "",
         "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]},
        {"task_id": 2, "text": "Write a function to negate a number.", "code": "", "test_list": ["assert neg(1) == -1"]},
    ])
    data["humaneval"] = _jsonl(folder / "humaneval.jsonl", [{
        "task_id": "HumanEval/0", "prompt": 'def add(a, b):\n    """Add a and b."""\n',
        "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
        "entry_point": "add",
    }])
    data["multiple-js"] = _jsonl(folder / "multiple-js.jsonl", [{
        "name": "HumanEval_0_add", "language": "js", "prompt": "//Add a and b.\nfunction add(a, b){\n",
        "tests": "const assert = require('node:assert');\nfunction test() {\n  assert.deepEqual(add(1, 2), 3);\n}\ntest();\n",
        "stop_tokens": ["\nfunction ", "\n/*", "\n//", "\nconsole.log"],
    }])
    data["multiple-cpp"] = _jsonl(folder / "multiple-cpp.jsonl", [{
        "name": "HumanEval_0_add", "language": "cpp", "prompt": "#include<assert.h>\n// Add a and b.\nlong add(long a, long b) {\n",
        "tests": "}\nint main() {\n    auto candidate = add;\n    assert(candidate(1, 2) == 3);\n}\n",
        "stop_tokens": ["\n}"],
    }])
    return data


def _data_args(suite_data: dict[str, Path], *names: str) -> list[str]:
    return [argument for name in names for argument in ("--data", f"{name}={suite_data[name]}")]


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    """A private copy of the finished default run, so that written results stay out of the shared one."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture
def fake_adapter(tmp_path: Path) -> Path:
    """An adapter folder good enough for the checks that run before any model is loaded."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x", "peft_type": "LORA"}))
    card = {"base-model": "builtin:tiny-llama", "quantization": 4,
            "prompt-format": {"name": "alpaca", "with-input": "{instruction}{input}", "without-input": "{instruction}"}}
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(runner, "load_model", refuse)


def _evaluate(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(["evaluate", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _table_rows(out: str) -> dict[str, list[str]]:
    """Return the printed table's rows by dataset name."""
    return {line.split()[0]: line.split() for line in out.splitlines() if line and line.split()[0] in _ROW_NAMES}


_ROW_NAMES = {
    "mmlu-stem", "mmlu-social-sciences", "mmlu-humanities", "fpb", "fiqa", "tfns", "pubmedqa", "medmcqa",
    "medqa", "careqa", "mbpp", "humaneval", "multiple-js", "multiple-cpp", "average", "tiny_sentiment",
}


def _check_suite_results(run: Path, suite: str, counts: dict[str, int], out: str, compare_base: bool) -> dict:
    """Check the printed table and the written JSON against the expected example counts; return the entry."""
    document = json.loads((run / "evaluation-adapter-final.json").read_text())
    assert document["adapter"] == str((run / "adapter-final").resolve())
    assert document["base-model"] == "builtin:tiny-llama"
    entry = document["evaluations"][suite]
    assert {name: figures["examples"] for name, figures in entry["datasets"].items()} == counts
    scores = [figures["score"] for figures in entry["datasets"].values()]
    assert all(0.0 <= score <= 1.0 for score in scores)
    assert entry["average"] == pytest.approx(sum(scores) / len(scores))
    assert entry["base-model"] == "builtin:tiny-llama" and entry["date"].endswith("Z")
    assert all(figures["source"].startswith("/") for figures in entry["datasets"].values())
    assert ("base-average" in entry) is compare_base
    rows = _table_rows(out)
    for name, count in counts.items():
        assert rows[name][1] == str(count)
        assert rows[name][3] == f"{100 * entry['datasets'][name]['score']:.2f}"
        if compare_base:
            assert rows[name][4] == f"{100 * entry['datasets'][name]['base-score']:.2f}"
    assert rows["average"][1] == str(sum(counts.values()))
    assert rows["average"][3] == f"{100 * entry['average']:.2f}"
    return entry


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.integration  # run_copy: the session's finished simulation (conftest)
def test_general_nlp_on_local_mmlu_with_base_comparison(run_copy, suite_data, capsys):
    status, out, _ = _evaluate([str(run_copy), "--suite", "general-nlp", "--compare-base",
                                *_data_args(suite_data, "mmlu")], capsys)
    assert status == 0
    # The run folder stands for its final adapter; MMLU rows are pooled per category.
    entry = _check_suite_results(run_copy, "general-nlp",
                                 {"mmlu-stem": 2, "mmlu-social-sciences": 2, "mmlu-humanities": 1}, out, True)
    assert entry["quantization"] == 4 and entry["metric"] == "accuracy"


@pytest.mark.integration
def test_finance_applies_the_reference_split_to_local_files(run_copy, suite_data, capsys):
    status, out, _ = _evaluate([str(run_copy), "--suite", "finance", *_data_args(suite_data, "fpb", "fiqa", "tfns")], capsys)
    assert status == 0
    # FPB and FiQA (its three splits concatenated): the seeded 25% test split of 8 rows is 2 rows.
    _check_suite_results(run_copy, "finance", {"fpb": 2, "fiqa": 2, "tfns": 3}, out, False)


@pytest.mark.integration
def test_medical_with_a_limit_and_results_accumulate(run_copy, suite_data, capsys):
    names = ("pubmedqa", "medmcqa", "medqa", "careqa")
    assert _evaluate([str(run_copy), "--suite", "medical", *_data_args(suite_data, *names)], capsys)[0] == 0
    status, out, _ = _evaluate([str(run_copy / "adapter-final"), "--suite", "medical", "--limit", "1",
                                *_data_args(suite_data, *names)], capsys)
    assert status == 0
    entry = _check_suite_results(run_copy, "medical", dict.fromkeys(names, 1), out, False)
    assert entry["limit"] == 1


@pytest.mark.integration
def test_code_runs_generated_programs_when_allowed(run_copy, suite_data, capsys):
    names = ("mbpp", "humaneval", "multiple-js", "multiple-cpp")
    if shutil.which("node") is None or shutil.which("g++") is None:
        pytest.skip("MultiPL-E needs node and g++")
    status, out, _ = _evaluate([str(run_copy), "--suite", "code", "--allow-code-execution",
                                "--max-length-generation", "160", *_data_args(suite_data, *names)], capsys)
    assert status == 0
    entry = _check_suite_results(run_copy, "code", {"mbpp": 2, "humaneval": 1, "multiple-js": 1, "multiple-cpp": 1},
                                 out, False)
    # The code harness loads the base unquantized; pass@1 from one sample per problem.
    assert entry["quantization"] == 16 and entry["metric"] == "pass@1"
    assert entry["max-length-generation"] == 160


@pytest.mark.slow  # the installed `flowertune` command, in a subprocess
def test_flowertune_console_script_is_installed():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["flowertune"] == "flowertune_llm.tools.cli:main"
    executable = Path(sys.executable).parent / "flowertune"
    result = subprocess.run([str(executable), "evaluate", "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for suite in ("general-nlp", "finance", "medical", "code"):
        assert suite in result.stdout


# --- bad input: one message each, before any model is loaded, nothing written --------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--suite", "nlp"], "--suite: 'nlp' is not a suite; accepted: general-nlp, finance, medical, code"),
        (["--suite", "finance", "--data", "mmlu={tmp}"], "--data: 'mmlu' is not a dataset of suite finance; accepted: fpb, fiqa, tfns"),
        (["--suite", "code"], "only done with --allow-code-execution"),
        (["--suite", "finance", "--data", "fpb={tmp}/missing.jsonl"], "no such file or folder"),
        (["--suite", "finance", "--limit", "0"], "--limit: must be >= 1, got 0"),
        ([], "give --suite (general-nlp, finance, medical, code) or --lm-eval TASKS"),
        (["--data", "fpb={tmp}"], "--data: only used with --suite"),
    ],
)
def test_bad_arguments_get_one_message(fake_adapter, tmp_path, capsys, no_model_loading, argv, message):
    status, _, err = _evaluate([str(fake_adapter), *[a.format(tmp=tmp_path) for a in argv]], capsys)
    assert status == 2
    assert message in err
    assert err.count("error:") == 1
    assert not list(tmp_path.glob("evaluation-*.json"))


def test_data_file_missing_columns_names_them(fake_adapter, tmp_path, capsys, no_model_loading):
    wrong = _jsonl(tmp_path / "fpb.jsonl", [{"text": "Sales rose.", "label": 2}])
    status, _, err = _evaluate([str(fake_adapter), "--suite", "finance", "--data", f"fpb={wrong}"], capsys)
    assert status == 2
    assert "missing column(s) sentence of the fpb schema (needs sentence, label; found text, label)" in err
    assert not list(tmp_path.glob("evaluation-*.json"))


def test_folder_that_is_not_an_adapter_is_refused(tmp_path, capsys, no_model_loading):
    (tmp_path / "notes").mkdir()
    status, _, err = _evaluate([str(tmp_path / "notes"), "--suite", "finance"], capsys)
    assert status == 2
    assert "is not a saved adapter (it has no adapter_config.json)" in err


def test_hub_dataset_unreachable_offline_says_to_use_data(fake_adapter, capsys, no_model_loading):
    # HF_DATASETS_OFFLINE=1 (conftest): the hub is not asked, the message says how to go on.
    status, _, err = _evaluate([str(fake_adapter), "--suite", "finance"], capsys)
    assert status == 2
    assert "cannot load 'takala/financial_phrasebank' (sentences_50agree) from the Hugging Face Hub" in err
    assert "--data fpb=PATH" in err


def test_base_model_not_reachable_offline_is_refused(fake_adapter, suite_data, capsys, no_model_loading):
    card = json.loads((fake_adapter / CARD_FILE).read_text())
    (fake_adapter / CARD_FILE).write_text(json.dumps({**card, "base-model": "no-such-org/no-such-model"}))
    status, _, err = _evaluate([str(fake_adapter), "--suite", "finance", *_data_args(suite_data, "fpb", "fiqa", "tfns")], capsys)
    assert status == 2
    assert "base model: 'no-such-org/no-such-model' cannot be loaded" in err and "--base FOLDER" in err
    assert not list(fake_adapter.parent.glob("evaluation-*.json"))


# --- lm-evaluation-harness ------------------------------------------------------------------------


@pytest.fixture
def local_task(tmp_path: Path) -> Path:
    """A user's lm-eval task YAML on a local JSONL file (two-way sentiment, 4 examples)."""
    folder = tmp_path / "tasks"
    rows = [{"text": "Profit doubled", "label": 1}, {"text": "Heavy losses", "label": 0},
            {"text": "Record earnings", "label": 1}, {"text": "Shares collapsed", "label": 0}]
    data = _jsonl(folder / "sentiment.jsonl", rows)
    task = folder / "tiny_sentiment.yaml"
    task.write_text(
        "task: tiny_sentiment\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{text}}\\nSentiment:"\n'
        'doc_to_choice: ["negative", "positive"]\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return task


# lm-eval indexes its thousands of task YAMLs first (about 30 s here): slow tier.
@pytest.mark.slow
def test_lm_eval_runs_a_local_task_yaml_into_the_same_json(run_copy, suite_data, local_task, capsys):
    status, out, _ = _evaluate([
        str(run_copy), "--suite", "general-nlp", *_data_args(suite_data, "mmlu"),
        "--lm-eval", "tiny_sentiment", "--lm-eval-include", str(local_task), "--compare-base",
    ], capsys)
    assert status == 0
    evaluations = json.loads((run_copy / "evaluation-adapter-final.json").read_text())["evaluations"]
    assert set(evaluations) == {"general-nlp", "lm-eval"}
    entry = evaluations["lm-eval"]
    figures = entry["tasks"]["tiny_sentiment"]
    assert figures["examples"] == 4
    assert 0.0 <= figures["metrics"]["acc"] <= 1.0 and 0.0 <= figures["base-metrics"]["acc"] <= 1.0
    assert entry["quantization"] == 4 and entry["include-path"] == str(local_task.resolve())
    row = _table_rows(out)["tiny_sentiment"]
    assert row[1:4] == ["4", "acc", f"{100 * figures['metrics']['acc']:.2f}"]


@pytest.mark.slow
def test_unknown_lm_eval_task_is_refused_with_close_names(fake_adapter, local_task, capsys, no_model_loading):
    status, _, err = _evaluate([str(fake_adapter), "--lm-eval", "tiny_sentimnt", "--lm-eval-include", str(local_task)], capsys)
    assert status == 2
    assert "--lm-eval: task 'tiny_sentimnt' is not known to lm-eval; close: tiny_sentiment" in err
